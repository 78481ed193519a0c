"""User settings: `~/.mlfab.yml` (path from `MLFABRC_PATH`), with `./mlfab.yml` merged over it.

Its `directories` section has `run`, `data` and `pretrained_models`. An entry left empty falls back to
the `RUN_DIR`, `DATA_DIR` and `MODEL_DIR` environment variables. Values may use `$VARS` and `~`.
A commented default file is written the first time settings are read.
"""

import os
from pathlib import Path
from typing import Any

import yaml

from mlfab.config import merge
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
    return merge(settings, _read(local)) if local.is_file() else settings


def _directory(key: str) -> Path | None:
    """`directories.<key>` from the settings, else its environment variable; None when neither is set."""
    directories = load_settings().get("directories") or {}
    if not isinstance(directories, dict):
        raise SettingsError(
            f"`directories` in {settings_path()} must be a mapping with keys run, data and pretrained_models "
            f"(e.g. `directories:\n  data: /path/to/data`), not a {type(directories).__name__}."
        )
    value = directories.get(key)
    if value in (None, ""):
        value = os.environ.get(_ENV_VARS[key])
    return None if value in (None, "") else Path(os.path.expandvars(str(value))).expanduser()


def _required_directory(key: str) -> Path:
    path = _directory(key)
    if path is None:
        env = _ENV_VARS[key]
        raise SettingsError(
            f"The {key} directory is not set. Set `directories.{key}` in {settings_path()} "
            f"(or ./mlfab.yml), or set the {env} environment variable, e.g. `export {env}=/path/to/{key}`."
        )
    return path


def get_run_dir() -> Path:
    """The root directory for runs (`directories.run` or `RUN_DIR`)."""
    return _required_directory("run")


def get_data_dir() -> Path:
    """The root directory for datasets (`directories.data` or `DATA_DIR`)."""
    return _required_directory("data")


def get_pretrained_models_dir() -> Path:
    """The root directory for pretrained weights (`directories.pretrained_models` or `MODEL_DIR`)."""
    return _required_directory("pretrained_models")


def default_run_dir() -> Path:
    """The run directory launch uses when the config names none: the settings, else ./runs."""
    return _directory("run") or Path.cwd() / "runs"
