"""User settings: `~/.mlfab.yml` (path from `MLFABRC_PATH`), with `./mlfab.yml` merged over it.

Its `directories` section has `run`, `data` and `pretrained_models`. An entry left empty falls back to
the `RUN_DIR`, `DATA_DIR` and `MODEL_DIR` environment variables. Values may use `$VARS` and `~`.
A commented default file is written the first time settings are read.
"""

import os
from pathlib import Path
from typing import Any

import yaml

from mlfab.errors import SettingsError

DEFAULT_SETTINGS = """\
# mlfab user settings. Written by mlfab on first use; edit freely.
# ./mlfab.yml in the working directory is merged over this file.
directories:
  # Where runs (checkpoints, logs) go. Empty: the RUN_DIR environment variable, else ./runs.
  run: null
  # Where datasets live (mlfab.get_data_dir()). Empty: the DATA_DIR environment variable.
  data: null
  # Where pretrained weights live (mlfab.get_pretrained_models_dir()). Empty: the MODEL_DIR environment variable.
  pretrained_models: null
"""

_ENV_VARS = {"run": "RUN_DIR", "data": "DATA_DIR", "pretrained_models": "MODEL_DIR"}


def settings_path() -> Path:
    return Path(os.environ.get("MLFABRC_PATH", "~/.mlfab.yml")).expanduser()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SettingsError(f"The mlfab settings file {path} is not valid YAML; fix or delete it:\n{e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"The mlfab settings file {path} must hold a mapping (see the default it writes).")
    return data


def load_settings() -> dict[str, Any]:
    """Reads the settings afresh each call (they are small), writing the default file if none exists."""
    path = settings_path()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(DEFAULT_SETTINGS)
        except OSError:
            pass  # A read-only home is fine: the environment variables still work.
    settings = _read(path) if path.exists() else {}
    local = Path.cwd() / "mlfab.yml"
    if local.is_file():
        for section, values in _read(local).items():
            if isinstance(values, dict) and isinstance(settings.get(section), dict):
                settings[section] = {**settings[section], **values}
            else:
                settings[section] = values
    return settings


def _directory(key: str, required: bool = True) -> Path | None:
    directories = load_settings().get("directories") or {}
    if not isinstance(directories, dict):
        raise SettingsError(
            f"`directories` in {settings_path()} must be a mapping with keys run, data and pretrained_models "
            f"(e.g. `directories:\n  data: /path/to/data`), not a {type(directories).__name__}."
        )
    value = directories.get(key)
    env = _ENV_VARS[key]
    if value in (None, ""):
        value = os.environ.get(env)
    if value in (None, ""):
        if not required:
            return None
        raise SettingsError(
            f"The {key} directory is not set. Set `directories.{key}` in {settings_path()} "
            f"(or ./mlfab.yml), or set the {env} environment variable, e.g. `export {env}=/path/to/{key}`."
        )
    return Path(os.path.expandvars(str(value))).expanduser()


def get_run_dir() -> Path:
    """The root directory for runs (`directories.run` or `RUN_DIR`)."""
    path = _directory("run")
    assert path is not None
    return path


def get_data_dir() -> Path:
    """The root directory for datasets (`directories.data` or `DATA_DIR`)."""
    path = _directory("data")
    assert path is not None
    return path


def get_pretrained_models_dir() -> Path:
    """The root directory for pretrained weights (`directories.pretrained_models` or `MODEL_DIR`)."""
    path = _directory("pretrained_models")
    assert path is not None
    return path


def default_run_dir() -> Path:
    """The run directory launch uses when the config names none: the settings, else ./runs."""
    return _directory("run", required=False) or Path.cwd() / "runs"
