"""The training config: `mlfab.field`, `mlfab.Config`, and how several config sources become one.

A config is resolved from, in order (later wins): the Config class defaults, each dataclass, mapping
or YAML file given to `launch`, then `key=value` overrides from the command line. All problems in the
result (unknown keys, wrong types, missing required fields) are reported together in one error.
"""

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mlfab.errors import ConfigError
from mlfab.fields import HELP_KEY, field, field_help  # noqa: F401 - re-exported
from mlfab.slurm import SlurmConfig

ConfigT = TypeVar("ConfigT", bound="Config")

Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]


@dataclass(kw_only=True)
class Config:
    """The knobs every mlfab task has. Subclass it (also `kw_only=True`) to add your own."""

    # Data
    batch_size: int = field(help="Number of samples in each batch (per device)")
    num_dataloader_workers: int = field(0, help="Dataloader worker processes (0 loads in the training process)")

    # Optimizer (the default one: schedule-free AdamW with linear warmup)
    learning_rate: float = field(1e-3, help="Peak learning rate of the default optimizer")
    betas: tuple[float, float] = field((0.9, 0.999), help="Adam beta values of the default optimizer")
    weight_decay: float = field(1e-5, help="Weight decay, applied to weight matrices only")
    warmup_steps: int = field(100, help="Linear learning-rate warmup, in optimizer steps")
    clip_grad_norm: float | None = field(10.0, help="Clip the gradient norm to this value (null disables clipping)")
    batches_per_step: int = field(1, help="Batches accumulated into each optimizer step (gradient accumulation)")

    # Training length and validation
    max_steps: int | None = field(None, help="Stop after this many optimizer steps (null trains until stopped)")
    valid_every_n_steps: int | None = field(100, help="Validate every N optimizer steps (null disables)")
    valid_every_n_seconds: float | None = field(
        None, help="Validate every N seconds of wall-clock time (null disables)"
    )
    valid_first_n_seconds: float | None = field(
        None, help="Run the first validation after N seconds instead of after the first step"
    )
    valid_batches: int = field(10, help="Number of batches in each validation run")

    # Checkpoints
    save_every_n_steps: int | None = field(None, help="Save a checkpoint every N optimizer steps (null disables)")
    save_every_n_seconds: float | None = field(60.0 * 60.0, help="Save a checkpoint every N seconds (null disables)")
    keep_last_n_checkpoints: int = field(2, help="How many periodic checkpoints to keep (the final one is kept too)")

    # Bad data
    max_bad_samples_in_a_row: int | None = field(
        100, help="Stop when this many samples in a row fail to load (failed samples are skipped and counted)"
    )
    max_nonfinite_steps_in_a_row: int | None = field(
        10, help="Stop when this many optimizer steps in a row have a non-finite loss or gradient (each is skipped)"
    )

    # Hardware and reproducibility
    accelerator: str = field("auto", help="cpu, cuda, mps or auto (CUDA, then MPS, then CPU)")
    devices: int | str = field("auto", help="Devices per node: a number, or auto (every GPU; one CPU process)")
    num_nodes: int = field(1, help="Machines to train on (with MASTER_ADDR, MASTER_PORT and NODE_RANK, or Slurm)")
    strategy: str = field("auto", help="auto (DDP when there is more than one device), ddp, ddp_spawn, fsdp, ...")
    precision: Precision = field("auto", help="Numeric precision; auto is bf16-mixed on GPUs that support it, else 32")
    seed: int = field(1337, help="Random seed for torch, numpy and random")

    # Where the run lives
    run_dir: str | None = field(None, help="Root of all runs (default: mlfab settings, RUN_DIR, then ./runs)")
    exp_dir: str | None = field(None, help="This run's directory (default: <run_dir>/<task name>/run_<N>)")

    # Slurm
    slurm: SlurmConfig = field(SlurmConfig, help="The Slurm job that launcher='slurm' submits")


# ---------------------------------------------------------------------------------------------------------------------
# Resolution: sources -> one nested dict -> a typed, validated Config.


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"Cannot read config file {path}: {e.strerror}. Check the path.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is not valid YAML:\n{e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config file {path} must hold a mapping of config keys (like `batch_size: 16`), "
            f"but it holds a {type(data).__name__}."
        )
    return dict(data)


def to_dict(source: Any) -> dict[str, Any]:
    """A dataclass instance, mapping or YAML path as a plain nested dict."""
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return {f.name: _plain(getattr(source, f.name)) for f in dataclasses.fields(source)}
    if isinstance(source, Mapping):
        return {k: _plain(v) for k, v in source.items()}
    if isinstance(source, str | Path):
        return load_yaml(source)
    raise ConfigError(f"Cannot use {source!r} as a config: give a Config dataclass, a dict or a YAML file path.")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges `over` into a copy of `base`; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_override(arg: str) -> dict[str, Any]:
    """`a.b=3` -> {"a": {"b": 3}}; the value is read as YAML, so lists, numbers and null work."""
    key, sep, raw = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"Cannot read command-line argument {arg!r}: expected key=value or a YAML file path.")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def resolve_config(cls: type[ConfigT], *sources: Any) -> ConfigT:
    return build_config(cls, merge_sources(cls, *sources))


def merge_sources(cls: type, *sources: Any) -> dict[str, Any]:
    """The sources as one nested dict, later winning, not yet validated; run files give their `model.config`."""
    merged: dict[str, Any] = {}
    for source in sources:
        data = to_dict(source)
        if isinstance(source, str | Path):
            data = read_run_file(cls, data, source)
        merged = merge(merged, data)
    return merged


# A run file (every run's `config.yaml`) has LightningCLI's layout: `model: {config: {...}}` and `trainer: {...}`
# (the Trainer arguments given explicitly). `fit --config FILE` reads all of it; the mlfab form reads
# `model.config` and refuses a file that needs more, rather than silently train with other settings.


def read_run_file(cls: type, data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A run file's `model.config`; any other file unchanged."""
    model = data.get("model")
    own = _dataclass_type(_field_types(cls).get("model"))  # The config's own `model` field, if it has a `config`.
    if not isinstance(model, Mapping) or "config" not in model or (own and "config" in _field_types(own)):
        return data
    unused = [f"model.{k}" for k in data["model"] if k != "config"]
    for key, value in data.items():
        if key != "model" and not (value is None or value is False or value == {}):
            unused += [f"{key}.{k}" for k in value] if isinstance(value, Mapping) else [key]
    if unused:
        raise ConfigError(
            f"Config file {path} sets {', '.join(unused)}, which only the Lightning form applies. Run it with "
            f"`fit --config {path}` (e.g. `python -m my_package.my_task fit --config {path}`), or delete those "
            "entries to train with the config alone."
        )
    config = data["model"]["config"]
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(
            f"Config file {path}: model.config must hold a mapping of config keys, not a {type(config).__name__}."
        )
    return dict(config or {})


def build_config(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Builds the typed config, reporting every unknown key, wrong type and missing field at once."""
    import pydantic  # deferred: only needed when a config is built

    problems = list(_unknown_keys(cls, data, prefix=""))
    try:
        config = pydantic.TypeAdapter(cls).validate_python(dict(data))  # Unknown keys are reported above.
    except pydantic.ValidationError as e:
        problems.extend(_describe(cls, data, e.errors()))
        config = None
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Invalid config for {cls.__name__} ({len(problems)} problem(s)):\n{listing}")
    assert config is not None
    return config


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> type, with string annotations (`from __future__ import annotations`) evaluated."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # An annotation that cannot be evaluated: fall back to what the dataclass holds.
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _unknown_keys(cls: type, data: Mapping[str, Any], prefix: str) -> Sequence[str]:
    ftypes = _field_types(cls)
    problems = []
    for key, value in data.items():
        if key not in ftypes:
            close = difflib.get_close_matches(str(key), list(ftypes), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            problems.append(f"unknown key {prefix + str(key)!r}{hint}")
            continue
        sub = _dataclass_type(ftypes[key])
        if sub is not None and isinstance(value, Mapping):
            problems.extend(_unknown_keys(sub, value, prefix=f"{prefix}{key}."))
    return problems


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass in `Model`, `Model | None` or `Optional[Model]`, else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def type_name(tp: Any) -> str:
    """An annotation as a user reads it: `float | None`, `tuple[float, float]`, `'auto' | '32-true'`."""
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _describe(cls: type, data: Mapping[str, Any], errors: list[Any]) -> list[str]:
    """One line per config key (a union fails once per member), naming the expected type and the value given."""
    by_key: dict[str, tuple[Any, list[Any]]] = {}
    for err in errors:
        parts, tp = [], cls
        for item in err["loc"]:  # The leading field names; then list indices, dict keys or union members.
            sub = _dataclass_type(tp)
            if sub is None or item not in _field_types(sub):
                break
            parts.append(str(item))
            tp = _field_types(sub)[item]
        by_key.setdefault(".".join(parts) or str(err["loc"][0]), (tp, []))[1].append(err)
    lines = []
    for key, (tp, errs) in by_key.items():
        if errs[0]["type"] == "missing":
            lines.append(f"missing required key {key!r}: set it in the config or pass {key}=<value>")
            continue
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        why = "; ".join(dict.fromkeys(_why(key, e) for e in errs if e["type"] != "literal_error"))
        lines.append(f"key {key!r}: expected {type_name(tp)}{'; ' + why if why else ''} (got {value!r})")
    return lines


def _why(key: str, err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    index = [str(p) for p in err["loc"][len(key.split(".")) :] if isinstance(p, int)]
    return f"item {'.'.join(index)}: {msg[:1].lower()}{msg[1:]}" if index else f"{msg[:1].lower()}{msg[1:]}"


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
