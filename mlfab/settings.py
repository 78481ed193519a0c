"""User settings: `~/.mlfab.yml` (path from `MLFABRC_PATH`), with `./mlfab.yml` merged over it.

Its `directories` section has `run`, `data` and `pretrained_models`. An entry left empty falls back to
the `RUN_DIR`, `DATA_DIR` and `MODEL_DIR` environment variables. Values may use `~`, `$VAR`, `${VAR}` and, as the
file mlfab 0.2 wrote does, OmegaConf's `${oc.env:VAR}` and `${oc.env:VAR,default}`; a variable they name that is
not set is an error naming the file, the entry and the variable, except in an entry that is just its own fallback
variable (`run: ${oc.env:RUN_DIR}`, as 0.2 wrote), which reads as empty. A commented default file is written the
first time settings are read. Any other `directories` key, or a section other than `directories` and those mlfab 0.2
wrote (kept unused), is an error naming the file, the key and the closest known one: a typo is never ignored. In
those, a value 0.2 acted on where mlfab has a config key instead (`device.gpu: false`, a `device.use_*` dtype, an
`experiment.default_random_seed` other than 1337, `error_handling.maximum_exceptions`, ...) is an error naming the key
to set, or saying what mlfab does instead (`_V02_VALUES`).
"""

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from mlfab.config import UniqueKeyLoader, merge
from mlfab.errors import SettingsError

DEFAULT_SETTINGS = """\
# mlfab user settings. Written by mlfab on first use; edit freely.
# ./mlfab.yml in the working directory is merged over this file.
# Values may use ~, $VAR, ${VAR}, ${oc.env:VAR} and ${oc.env:VAR,default} (mlfab 0.2's files work as they are).
directories:
  # Where runs (checkpoints, logs) go. Empty: the RUN_DIR environment variable, else ./runs.
  run: null
  # Where datasets live (mlfab.get_data_dir()). Empty: the DATA_DIR environment variable.
  data: null
  # Where pretrained weights live (mlfab.get_pretrained_models_dir()). Empty: the MODEL_DIR environment variable.
  pretrained_models: null
"""

_ENV_VARS = {"run": "RUN_DIR", "data": "DATA_DIR", "pretrained_models": "MODEL_DIR"}
# The sections a settings file may hold: `directories`, and those mlfab 0.2 wrote, which are accepted (so a 0.2 file
# works as it is) at 0.2's defaults (`_V02_VALUES`). Anything else is a typo or a setting mlfab does not have: an
# error, never ignored.
_V02_SECTIONS = ("error_handling", "logging", "device", "triton", "experiment")
_SECTIONS = ("directories", *_V02_SECTIONS)
# Every value of those sections 0.2 acted on: 0.2's default is accepted, any other value stops with what to do instead,
# never ignored. {(section, key): (0.2's default, what 0.2 then did, the config key now (`key=value`), or, where no
# config key does what 0.2 did, what mlfab does instead (an `_Instead`))}.


class _Instead(str):
    """What mlfab does where no config key does what a 0.2 setting did."""


_NO_SLEEP = _Instead("mlfab skips a failing sample at once (no sleep); the limit is `max_bad_samples_in_a_row`")
_SUMMARY = _Instead(
    "mlfab logs the first 3 failures of each kind in full, then a summary of the kinds and places every minute"
)
_THIRD_PARTY = _Instead(
    "mlfab leaves the levels of Python's `logging` to you (`logging.getLogger(name).setLevel(...)`)"
)
_V02_VALUES: dict[tuple[str, str], tuple[bool | int | float | str, str, str]] = {
    ("device", "gpu"): (True, "trained on the CPU", "accelerator=cpu"),
    ("device", "metal"): (True, "trained on the CPU instead of Apple's MPS", "accelerator=cpu"),
    ("device", "use_fp64"): (False, "cast batches to float64", "precision=64-true"),
    ("device", "use_fp32"): (False, "trained in float32", "precision=32-true"),
    ("device", "use_bf16"): (False, "cast batches to bfloat16 and ran under autocast", "precision=bf16-mixed"),
    ("device", "use_fp16"): (False, "cast batches to float16 and ran under autocast", "precision=16-mixed"),
    ("experiment", "default_random_seed"): (1337, "seeded with it", "seed={value}"),
    ("experiment", "max_workers"): (32, "capped its default dataloader worker count at it", "num_dataloader_workers=N"),
    ("experiment", "multiprocessing_start_method"): (
        "forkserver",
        "started dataloader workers that way",
        _Instead("mlfab's workers start as torch's DataLoader starts them (fork on Linux)"),
    ),
    ("error_handling", "enabled"): (True, "raised a sample's first exception", "max_bad_samples_in_a_row=1"),
    ("error_handling", "maximum_exceptions"): (
        10,
        "stopped after that many failing samples",
        "max_bad_samples_in_a_row={value}",
    ),
    ("error_handling", "backoff_after"): (5, "slept after that many failures", _NO_SLEEP),
    ("error_handling", "sleep_backoff"): (0.1, "slept that long between failures", _NO_SLEEP),
    ("error_handling", "sleep_backoff_power"): (2.0, "grew its sleep that way", _NO_SLEEP),
    ("error_handling", "log_full_exception"): (False, "logged every failure in full", _SUMMARY),
    ("error_handling", "flush_exception_summary_every"): (500, "summarised failures at that cadence", _SUMMARY),
    ("error_handling", "report_top_n_exception_types"): (5, "summarised that many kinds of failure", _SUMMARY),
    ("error_handling", "exception_location_traceback_depth"): (3, "located failures that deep", _SUMMARY),
    ("logging", "hide_third_party_logs"): (True, "showed matplotlib's, PIL's and torch's INFO logs", _THIRD_PARTY),
    ("logging", "log_level"): ("INFO", "set the root logger's level to it", _THIRD_PARTY),
}
# The keys of each 0.2 section: those above, and two whose either value holds: `device.cpu` (0.2 never read it) and
# `triton.use_triton_if_available` (it chose 0.2's own Triton kernels, which mlfab does not have).
_V02_KEYS = {
    section: (
        *(k for s, k in _V02_VALUES if s == section),
        *{"device": ("cpu",), "triton": ("use_triton_if_available",)}.get(section, ()),
    )
    for section in _V02_SECTIONS
}
_TRUE, _FALSE = ("y", "yes", "on", "true"), ("n", "no", "off", "false")  # As OmegaConf reads a bool.


def settings_path() -> Path:
    return Path(os.environ.get("MLFABRC_PATH", "~/.mlfab.yml")).expanduser()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise SettingsError(f"The mlfab settings file {path} is not valid YAML; fix or delete it:\n{e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"The mlfab settings file {path} must hold a mapping (see the default it writes).")
    _check_keys(path, data, _SECTIONS)
    directories = data.get("directories")
    if isinstance(directories, dict):  # (Its other shapes are refused, naming them, where it is read.)
        _check_keys(path, directories, tuple(_ENV_VARS), parent="directories")
    for section in _V02_SECTIONS:  # A typo in one (`default_random_sed`) would keep 0.2's default unseen.
        if isinstance(data.get(section), dict):
            _check_keys(path, data[section], _V02_KEYS[section], parent=section)
        elif data.get(section) is not None:
            raise SettingsError(
                f"The mlfab settings file {path} has `{section}: {data[section]!r}`; mlfab 0.2's `{section}` section "
                f"holds the keys {', '.join(_V02_KEYS[section])}. Remove it, or give it as a mapping."
            )
    return data


def _check_keys(path: Path, data: dict[Any, Any], known: tuple[str, ...], parent: str = "") -> None:
    """Refuses a key of `data` (the file's top level, or its section `parent`) that is not in `known`."""
    name = (lambda key: f"`{parent}.{key}`") if parent else (lambda key: f"`{key}`")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" (did you mean {name(close[0])}?)" if close else ""
            listing = (
                f"the keys of `{parent}` are {', '.join(known)}"
                if parent
                else f"the sections are directories and, accepted unused from mlfab 0.2, {', '.join(_V02_SECTIONS)}"
            )
            raise SettingsError(
                f"The mlfab settings file {path} has an unknown {'key' if parent else 'section'} {name(key)}{hint}; "
                f"{listing}. Rename or remove it."
            )


def _files() -> list[tuple[Path, dict[str, Any]]]:
    """The settings files that exist and what each holds, the user file first (writing its default if there is
    none), then ./mlfab.yml."""
    path = settings_path()
    if path.exists() and not path.is_file():  # (Read as no settings at all, and named as the file to fix.)
        raise SettingsError(f"The mlfab settings file {path} is not a file: point MLFABRC_PATH at a file, or unset it.")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(DEFAULT_SETTINGS)
        except OSError:
            pass  # A read-only home is fine: the environment variables still work.
    local = Path.cwd() / "mlfab.yml"
    files = [(p, _read(p)) for p in (path, local) if p.is_file()]
    problems = [problem for entry in _V02_VALUES.items() if (problem := _v02_value_problem(files, *entry))]
    if problems:
        raise SettingsError("\n".join(problems))
    return files


def _v02_value_problem(
    files: list[tuple[Path, dict[str, Any]]], where: tuple[str, str], entry: tuple[bool | int | float | str, str, str]
) -> str | None:
    """What is wrong with `section.key` (a `_V02_VALUES` entry) where the file that sets it last gives a value other
    than mlfab 0.2's default: 0.2 acted on it, mlfab does not read it."""
    (section, key), (default, did, instead) = where, entry
    found = [(p, d[section][key]) for p, d in files if isinstance(d.get(section), dict) and key in d[section]]
    if not found:
        return None
    path, written = found[-1]  # ./mlfab.yml is merged over the user file.
    name = f"`{section}.{key}` in {path}"
    try:
        value: Any = _expand(written, name) if isinstance(written, str) else written
    except _Unset as e:
        return f"{name} is {written!r}, but the environment variable {e.name} is not set: set it or remove the entry."
    if isinstance(default, bool) and isinstance(value, str):
        lowered = value.strip().lower()
        value = True if lowered in _TRUE else False if lowered in _FALSE else value
    try:
        if isinstance(default, str):
            value = str(value)
        elif isinstance(default, float):
            value = float(value)
        elif not isinstance(value, bool):  # Not rounded or truthy: 1337.9 is no seed, 2 no switch.
            number = float(value)
            if not number.is_integer() or (isinstance(default, bool) and number not in (0, 1)):
                raise ValueError(value)
            value = type(default)(int(number))
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        return f"{name} is {written!r}: it must be {kind} (mlfab 0.2's default is {_shown(default)})."
    if value == default:
        return None
    read = (
        f"{_shown(written)}, read as {_shown(value)}"
        if isinstance(written, str) and value != written
        else _shown(written)
    )
    if isinstance(instead, _Instead):
        return (
            f"{name} is {read}: mlfab 0.2 then {did}, but mlfab has no such setting; {instead}. Remove "
            f"`{section}.{key}` from that file (0.2's default, {_shown(default)}, is accepted)."
        )
    fix = instead.format(value=value)
    return (
        f"{name} is {read}: mlfab 0.2 then {did}, but mlfab does not read this setting. Set the config key "
        f"instead (`{fix}` on the command line, `{fix.replace('=', ': ', 1)}` in a config file) and remove "
        f"`{section}.{key}` from that file."
    )


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def load_settings() -> dict[str, Any]:
    """Reads the settings afresh each call (they are small), writing the default file if none exists. Values are as
    written: variables are expanded when a directory is read."""
    return functools.reduce(merge, (data for _, data in _files()), {})


# ---------------------------------------------------------------------------------------------------------------------
# Variables in values: ${oc.env:VAR}, ${oc.env:VAR,default} (OmegaConf's, as mlfab 0.2 wrote them), ${VAR}, $VAR.


class _Unset(Exception):
    """A value names an environment variable that is not set, and gives no default."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OC_ENV = re.compile(r"\s*oc\.env\s*:(.*)", re.DOTALL)
_DOLLAR_NAME = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_ONLY_VARIABLE = re.compile(r"\$(?:\{\s*(?:oc\.env\s*:\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\}|([A-Za-z_][A-Za-z0-9_]*))")
_SYNTAX = "${oc.env:VAR}, ${oc.env:VAR,default}, ${VAR} and $VAR"


def _closing(text: str, start: int, where: str) -> int:
    """The index of the `}` closing the interpolation whose body starts at `start` (nested `${...}` and quoted
    strings inside it are skipped)."""
    depth, i = 1, start
    while i < len(text):
        if text[i] in "'\"":
            end = text.find(text[i], i + 1)
            if end < 0:
                break
            i = end
        elif text.startswith("${", i):
            depth, i = depth + 1, i + 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise SettingsError(f"{where}: an interpolation `${{` is not closed in {text!r}.")


def _split_args(body: str) -> list[str]:
    """`oc.env`'s arguments: `body` split at the commas outside quotes and nested interpolations."""
    args, depth, current, i = [], 0, "", 0
    while i < len(body):
        char = body[i]
        if char in "'\"":
            end = body.find(char, i + 1)
            end = len(body) - 1 if end < 0 else end
            current, i = current + body[i : end + 1], end + 1
            continue
        if body.startswith("${", i):
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "," and depth == 0:
            args.append(current)
            current = ""
        else:
            current += char
        i += 1
    return [*args, current]


def _unquote(arg: str) -> str | None:
    """A quoted argument's text, else None."""
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    return None


def _interpolation(body: str, where: str, text: str) -> str | None:
    """The value of `${body}`: OmegaConf's `oc.env` resolver, or a shell-style `${VAR}`."""
    oc_env = _OC_ENV.fullmatch(body)
    if oc_env is None:
        if _NAME.fullmatch(body.strip()):
            return _env(body.strip())
        raise SettingsError(
            f"{where} is {text!r}: mlfab settings expand {_SYNTAX}, not the OmegaConf interpolation ${{{body}}}. "
            "Write the path out, or use an environment variable."
        )
    args = [a.strip() for a in _split_args(oc_env.group(1))]
    if len(args) > 2 or not args[0]:
        raise SettingsError(
            f"{where} is {text!r}: ${{oc.env:...}} takes a variable name and at most one default, as in "
            "${oc.env:DATA_DIR} or ${oc.env:DATA_DIR,/path/to/data} (quote a default that holds a comma)."
        )
    name = _unquote(args[0]) or args[0]
    if name in os.environ or len(args) == 1:
        return _env(name)
    quoted = _unquote(args[1])
    if quoted is not None:
        return quoted
    return None if args[1] == "null" else _expand(args[1], where)


def _env(name: str) -> str:
    if name not in os.environ:
        raise _Unset(name)
    return os.environ[name]


def _expand(text: str, where: str) -> str | None:
    """`text` with its variables expanded (OmegaConf's `\\${` is a literal `${`). None when the whole value is an
    `${oc.env:VAR,null}` whose variable is not set."""
    parts: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("\\${", i):
            parts.append("${")
            i += 3
        elif text.startswith("${", i):
            end = _closing(text, i + 2, where)
            value = _interpolation(text[i + 2 : end], where, text)
            if i == 0 and end == len(text) - 1:
                return value
            parts.append(str(value))  # As OmegaConf does: a null inside a string reads "None".
            i = end + 1
        else:
            stop = min((j for j in (text.find("${", i), text.find("\\${", i)) if j >= 0), default=len(text))
            parts.append(_DOLLAR_NAME.sub(lambda m: _env(m.group(1)), text[i:stop]))
            i = stop
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# The directories.


def _entry(key: str) -> tuple[Any, Path | None]:
    """`directories.<key>` as written, and the file it is written in: ./mlfab.yml where it sets the key, else the
    user file. (None, None) when neither sets it."""
    found: tuple[Any, Path | None] = (None, None)
    for path, data in _files():
        directories = data.get("directories")
        if directories is None:
            continue
        if not isinstance(directories, dict):
            raise SettingsError(
                f"`directories` in {path} must be a mapping with keys run, data and pretrained_models "
                f"(e.g. `directories:\n  data: /path/to/data`), not a {type(directories).__name__}."
            )
        if key in directories:
            found = (directories[key], path)
    return found


def _own_variable(key: str, value: Any) -> bool:
    """Whether the entry is just its own fallback variable, as mlfab 0.2 wrote it: `run: ${oc.env:RUN_DIR}`."""
    match = _ONLY_VARIABLE.fullmatch(value.strip()) if isinstance(value, str) else None
    return match is not None and (match.group(1) or match.group(2)) == _ENV_VARS[key]


def _directory(key: str) -> Path | None:
    """`directories.<key>` from the settings, else its environment variable; None when neither is set."""
    value, path = _entry(key)
    # A number is a directory's name; YAML reads `yes`, `off` or `true` as a bool, which would be a folder `True`.
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise SettingsError(
            f"`directories.{key}` in {path} is {value!r}: give one path (a string), or leave it empty to use "
            f"{_ENV_VARS[key]}."
        )
    if isinstance(value, str):
        where = f"`directories.{key}` in {path}"
        try:
            value = _expand(value, where)
        except _Unset as e:
            if not _own_variable(key, value):
                raise SettingsError(
                    f"{where} is {value!r}, but the environment variable {e.name} is not set. Set it "
                    f"(`export {e.name}=...`), give a default as `${{oc.env:{e.name},/path/to/{key}}}`, or write "
                    "the path out."
                ) from None
            value = None  # mlfab 0.2's `${oc.env:RUN_DIR}` with RUN_DIR unset: not set, as 0.2 read it.
    if value in (None, ""):
        value = os.environ.get(_ENV_VARS[key])
    return None if value in (None, "") else Path(str(value)).expanduser()


def _required_directory(key: str) -> Path:
    path = _directory(key)
    if path is None:
        env = _ENV_VARS[key]
        value, where = _entry(key)
        written = f" (it is {value!r} there, and {env} is not set)" if _own_variable(key, value) else ""
        raise SettingsError(
            f"The {key} directory is not set. Set `directories.{key}` in {where or settings_path()}{written} "
            f"(or ./mlfab.yml), or set the {env} environment variable, e.g. `export {env}=/path/to/{key}`."
        )
    return path


@overload
def get_run_dir(*, missing_ok: Literal[False] = False) -> Path: ...


@overload
def get_run_dir(*, missing_ok: bool) -> Path | None: ...


def get_run_dir(*, missing_ok: bool = False) -> Path | None:
    """The root directory for runs (`directories.run` or `RUN_DIR`). When neither is set: an error, or None with
    `missing_ok=True` (mlfab 0.2's keyword). Launch itself falls back to ./runs."""
    return _directory("run") if missing_ok else _required_directory("run")


def get_data_dir() -> Path:
    """The root directory for datasets (`directories.data` or `DATA_DIR`)."""
    return _required_directory("data")


def get_pretrained_models_dir() -> Path:
    """The root directory for pretrained weights (`directories.pretrained_models` or `MODEL_DIR`)."""
    return _required_directory("pretrained_models")


def default_run_dir() -> Path:
    """The run directory launch uses when the config names none: the settings, else ./runs."""
    return _directory("run") or Path.cwd() / "runs"
