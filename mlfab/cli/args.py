"""The short form of the command line, `python -m my.task [file.yaml ...] [key=value ...]`, as `fit` arguments.

    key=value            ->  --model.config.key=value   (dotted keys for nested fields; the value is read as YAML)
    config.yaml          ->  --model.config config.yaml (a file of config keys)
    runs/.../config.yaml ->  --config runs/.../config.yaml (a run file: `model: {config: ...}`, `trainer: ...`)

Nothing else parses these arguments: jsonargparse does, as for `fit`. The plain values are kept beside, only to
explain a refusal key by key.
"""

import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import lightning.pytorch as pl
import yaml

from mlfab.config import dataclass_type, field_default, field_types, load_yaml, show, to_dict, type_name
from mlfab.errors import ConfigError
from mlfab.run.invocation import command_name

SUBCOMMANDS = ("fit", "validate", "test", "predict")
PASSED_ON = ("-h", "--help", "--print_config")  # Flags the short form takes as they are.


def _flag_refusal(arg: str, task_cls: Any) -> str:
    """Why the short form refuses the flag `arg`, and what to type instead (only what exists: a config key of
    `task_cls`, a Trainer argument)."""
    flag, given, value = arg.partition("=")
    value = value if given else "..."
    key, cmd = flag.lstrip("-"), command_name()
    start = f"Unknown option {arg!r}: this form takes YAML files and key=value arguments"
    if key.startswith("model.config."):
        return f"{start}: give {key.removeprefix('model.config.')}={value}, or `{cmd} fit {flag}={value}`."
    if "." in key:  # --trainer.max_epochs, --optimizer.lr, ...: flags of the subcommand form alone.
        return f"{start} (config keys); {flag} needs a subcommand first, as in `{cmd} fit {flag}={value}`."
    where = [f"--model.config.{key}"] if key in field_types(task_cls.config_class()) else []
    where += [f"--trainer.{key}"] if key in inspect.signature(pl.Trainer.__init__).parameters else []
    if where:
        example = f"{key}={value} or " if where[0].startswith("--model") else ""
        return (
            f"{start} (e.g. {example}`{cmd} fit {where[0]}={value}`): {' and '.join(where)} need a subcommand first; "
            f"see `{cmd} --help`."
        )
    if key in ("l", "launcher"):  # mlfab 0.2's `-l/--launcher slurm`.
        return f"{start}; the launcher is chosen in the script, as `launch(..., launcher='slurm')`."
    return f"{start}; {key!r} is neither a config key nor a Trainer argument (see `{cmd} --help`)."


def short_form_args(task_cls: Any, argv: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """`fit`'s arguments for `argv` in the short form, and the plain values each argument sets."""
    args: list[str] = []
    values: list[dict[str, Any]] = []
    for arg in argv:
        if arg.partition("=")[0] in PASSED_ON:
            args.append(arg)
        elif arg.startswith("-"):
            raise ConfigError(_flag_refusal(arg, task_cls))
        elif "=" in arg:
            key, _, raw = arg.partition("=")
            if not key or "" in key.split("."):
                raise ConfigError(f"Cannot read command-line argument {arg!r}: expected key=value or a YAML file path.")
            args.append(f"--model.config.{arg}")
            values.append(_nested(key.split("."), _yaml_value(raw)))
        else:
            file_args, file_values = config_file_args(task_cls, arg)
            args += file_args
            values.append(file_values)
    return args, values


def args_into_whole_values(config_cls: type, argv: Sequence[str]) -> list[str]:
    """The `key=value` arguments of the short form whose dotted key goes into a value that is set only whole (see
    `whole_value_at`)."""
    return [
        arg
        for arg in argv
        if "=" in arg
        and not arg.startswith("-")
        and arg.partition("=")[0] not in PASSED_ON
        and whole_value_at(config_cls, arg.partition("=")[0].split(".")) is not None
    ]


def whole_value_at(config_cls: type, parts: Sequence[str]) -> tuple[int, Any] | None:
    """For a dotted key, split in `parts`: how many of its first parts name a value that is set only whole (a tuple,
    list, number, string: jsonargparse reads `--x.1 16` for a tuple `x` as the pair (1, 16), silently), and that
    value's type. None where each part but the last names a nested config or a mapping (a dotted key sets one of
    its keys or entries), or where a part is no config key (refused as an unknown key)."""
    tp: Any = config_cls
    for i, part in enumerate(parts[:-1]):
        cls = dataclass_type(tp)
        if cls is not None:
            if part not in field_types(cls):
                return None
            tp = field_types(cls)[part]
        else:
            tp = _entry_type(tp)
        if tp is Any:
            return None
        if dataclass_type(tp) is None and _entry_type(tp) is None:
            return i + 1, tp
    return None


def _entry_type(tp: Any) -> Any:
    """The type of a mapping's entries (`dict[str, int]`: int; `bool | dict[str, Any]`: Any; Any for a value typed
    Any), or None for a type that is no mapping."""
    if tp is Any or tp is object:
        return Any
    origin = typing.get_origin(tp) or tp
    if origin in (typing.Union, types.UnionType):
        found = [entry for entry in map(_entry_type, typing.get_args(tp)) if entry is not None]
        return found[0] if found else None
    if isinstance(origin, type) and issubclass(origin, Mapping):
        args = typing.get_args(tp)
        return args[1] if len(args) == 2 else Any
    return None


def whole_value_problem(config_cls: type, key: str, raw: str | None, current: Mapping[str, Any], flag: bool) -> str:
    """Why the dotted key `key` (with the value `raw` as typed) is refused, named as typed (`flag`: in the `fit` form,
    `--model.config.<key>`), with the whole value to give instead, made from its value now (`current`, the config
    data given so far; else the class default)."""
    parts = key.split(".")
    found = whole_value_at(config_cls, parts)
    assert found is not None
    count, tp = found
    whole, rest = ".".join(parts[:count]), parts[count:]
    now = _value_at(config_cls, current, parts[:count])
    if isinstance(now, list | tuple):
        items = list(now)
        if len(rest) == 1 and rest[0].isdigit() and int(rest[0]) < len(items) and raw is not None:
            items[int(rest[0])] = _yaml_value(raw)
        example = "[" + ",".join(show(item) for item in items) + "]"
    else:
        example = raw if raw is not None else "..."
    if flag:
        named, instead = f"--model.config.{key}", f"--model.config.{whole} {example}"
    else:
        named, instead = f"key {key!r}", f"{whole}={example}"
    return (
        f"{named}: {whole} ({type_name(tp)}) takes a whole value, not one item or key of it (a dotted key goes "
        f"into a nested config or a mapping only); give the whole value, e.g. {instead}"
    )


def _value_at(cls: Any, data: Any, parts: Sequence[str]) -> Any:
    """The value at `parts` in plain config data of the dataclass `cls`, else `cls`'s default there (None for none)."""
    for part in parts:
        found = {f.name: f for f in dataclasses.fields(cls)}.get(part) if cls is not None else None
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif (default := dataclasses.MISSING if found is None else field_default(found)) is dataclasses.MISSING:
            return None
        else:
            data = to_dict(default) if dataclasses.is_dataclass(default) else default
        cls = dataclass_type(field_types(cls).get(part)) if cls is not None else None
    return data


def config_file_args(task_cls: Any, arg: str | PurePath) -> tuple[list[str], dict[str, Any]]:
    """The arguments that read a YAML file: `--config` for a run file, `--model.config` for a file of config keys."""
    path = find_config_file(task_cls, arg)
    data = load_yaml(path)
    if not is_run_file(task_cls.config_class(), data):
        return ["--model.config", str(path)], data
    config = data["model"]["config"]
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(
            f"Config file {path}: model.config must hold a mapping of config keys, not a {type(config).__name__}."
        )
    return ["--config", str(path)], dict(config or {})


def find_config_file(task_cls: Any, arg: str | PurePath) -> Path:
    """The YAML file `arg` names, as an absolute path: a relative name is looked up in the working directory, then
    next to the task's source file (where a script keeps its YAML files, whatever directory it is run from)."""
    path = Path(arg).expanduser()
    if path.is_absolute():
        tried = [(path, "")]
    else:
        source = _source_dir(task_cls)
        tried = [(Path.cwd() / path, "in the working directory")]
        if source is not None:
            tried.append((source / path, f"next to {task_cls.__name__}'s source file"))
    for candidate, _ in tried:
        if candidate.is_file():
            return candidate
    looked = " and ".join(_described(candidate, where) for candidate, where in tried)
    if not path.is_absolute() and len(tried) == 1:
        looked += f" ({task_cls.__name__} has no source file to look next to)"
    raise ConfigError(
        f"Config file {str(arg)!r} not found; looked for {looked}. Pass key=value or an existing YAML file."
    )


def _described(candidate: Path, where: str) -> str:
    notes = [note for note in (where, "a directory" if candidate.is_dir() else "") if note]
    return f"{candidate} ({'; '.join(notes)})" if notes else str(candidate)


def _source_dir(task_cls: Any) -> Path | None:
    """The directory of the file that defines the task class, or None (a class typed into a notebook or `-c`)."""
    try:
        return Path(os.path.abspath(inspect.getfile(task_cls))).parent
    except (TypeError, OSError):
        return None


def is_run_file(config_cls: type, data: Mapping[str, Any]) -> bool:
    """Whether a YAML file has a run file's layout (`model: {config: ...}`), rather than config keys; a config with
    a `model` field that has a `config` field of its own reads as config keys."""
    model = data.get("model")
    if not isinstance(model, Mapping) or "config" not in model:
        return False
    own = dataclass_type(field_types(config_cls).get("model"))
    return not (own is not None and "config" in field_types(own))


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def _nested(parts: list[str], value: Any) -> dict[str, Any]:
    return {parts[0]: _nested(parts[1:], value) if len(parts) > 1 else value}


def short_form_usage() -> str:
    cmd = command_name()
    return (
        f"usage: {cmd} [config.yaml ...] [key=value ...] [--print_config] [--help]\n"
        f"       {cmd} {{{','.join(SUBCOMMANDS)}}} [--help] ...\n\n"
        "The first form is `fit` written short: key=value stands for --model.config.key=value (dotted keys set nested "
        "fields; the value is read as YAML, so betas=[0.9,0.95] and max_steps=null work), a YAML file of config keys "
        "for --model.config FILE, and a run's config.yaml for --config FILE. A relative file name is looked up in the "
        "working directory, then next to the task's source file. The arguments apply in order, later ones winning. "
        "`fit` takes:\n"
    )
