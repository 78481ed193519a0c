"""The training config: `mlfab.field`, `mlfab.Config`, and turning plain data into a checked config.

jsonargparse (the command line's parser) builds and checks configs everywhere, so a value is accepted or refused
the same way whether it comes from a flag, a YAML file, a dict or a checkpoint. When it refuses one, mlfab lists
every problem at once (unknown keys with close matches, wrong types, missing required keys), by the key as typed.
The ranges jsonargparse does not know (`learning_rate > 0`, `batches_per_step >= 1`, ...) are the table `RULES`,
checked on the same paths and listed with the rest; `check_config` checks a Config built in Python.
"""

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import jsonargparse
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from mlfab.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="Config")


def field(default: Any = dataclasses.MISSING, *, help: str = "") -> Any:  # noqa: A002
    """A dataclass field with help text (shown by `--help`; optional, as in mlfab 0.2).

    A callable default becomes a default factory; a mutable default (list, dict, set, dataclass) is
    deep-copied for every instance, so two configs never share it.
    """
    metadata = {"help": help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if callable(default):  # Includes classes: `field(ModelConfig, ...)` gives each instance a fresh one.
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, list | dict | set) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


@dataclass(kw_only=True)
class SlurmConfig:
    """The resources and options of the batch job that `launcher="slurm"` submits."""

    nodes: int = field(1, help="Number of nodes the Slurm job uses")
    gpus_per_node: int = field(1, help="GPUs per node; one task (training process) is started per GPU")
    cpus_per_task: int = field(8, help="CPU cores per task (for dataloader workers)")
    mem: str | None = field(None, help="Memory per node, as sbatch --mem takes it (e.g. 64G; null: cluster default)")
    time: str | None = field("1-00:00:00", help="Time limit per job (D-HH:MM:SS); the job requeues itself at the end")
    partition: str | None = field(None, help="Slurm partition (null: the cluster's default)")
    account: str | None = field(None, help="Slurm account to charge (null: your default)")
    signal_seconds: int = field(90, help="Seconds before the time limit when Slurm tells the job to save and requeue")
    extra_sbatch_lines: list[str] = field(
        list, help="More sbatch options: '--qos=high' becomes '#SBATCH --qos=high'; other lines are copied verbatim"
    )
    python: str | None = field(None, help="Python interpreter the job runs (null: the one that submits it)")


Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]
Diagnostic = Literal["grad_norm", "speed", "time", "memory", "loss_scale"]  # mlfab.run.diagnostics


@dataclass(kw_only=True)
class Config:
    """The knobs every mlfab task has. Subclass it (also `kw_only=True`) to add your own."""

    # Data
    batch_size: int | None = field(
        help="Number of samples in each batch (per device); null: the task's get_batch_size()"
    )
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

    # Diagnostics (mlfab.run.diagnostics): training values mlfab logs by itself, computed only at written steps
    diagnostics: list[Diagnostic] = field(
        list(typing.get_args(Diagnostic)),
        help="Which to log: grad_norm (optim/grad_norm), speed (speed/steps_per_second, speed/samples_per_second, "
        "speed/data_wait_s), time (time/remaining_s, with max_steps), memory (memory/cpu_peak_rss_mb, "
        "memory/gpu_peak_mb on CUDA), loss_scale (optim/loss_scale, with 16-mixed); [] logs none",
    )

    # Speed
    compile: bool | dict[str, Any] = field(
        False,
        help="torch.compile the task's forward: true (torch's defaults), or a mapping of torch.compile's options "
        "(mode, fullgraph, dynamic, backend, options), e.g. {mode: max-autotune}; false runs eagerly. Compiling "
        "costs seconds to minutes at the first step (printed and logged as time/compile_s); it pays off for "
        "compute-heavy models",
    )
    async_checkpoints: bool = field(
        True,
        help="Write periodic checkpoints in a background thread: training waits only for a copy in host memory "
        "(one checkpoint's size, on rank 0). The checkpoint at the end of training or on a signal, and every "
        "checkpoint of a task overriding on_before_save_ckpt/on_after_save_ckpt, is written synchronously",
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
# Ranges: what each value of mlfab's configs must be, beyond its type. Keyed by the class that declares the field;
# a subclass gets its bases' rules for every field it keeps the type of, or narrows to not None (a field redeclared
# with another type is its own). A field without a rule takes any value of its type.


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _integer(v) and v >= low


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _matches(pattern: str, flags: int = 0) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and re.fullmatch(pattern, v, flags=flags) is not None


ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
MAX_SEED = 2**32 - 1  # numpy's bound: mlfab seeds numpy with it.
_DEVICES = r"auto|0*[1-9]\d*|(\d+\s*,\s*)+\d*"  # A number, or GPU indices as Lightning reads them: "0,1", "3,".
_SLURM_TIME = r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite"  # sbatch --time's formats.


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_OPTIONS: dict[str, Callable[[Any], bool]] = {  # torch.compile's keyword arguments mlfab passes on.
    "mode": lambda v: v in COMPILE_MODES,
    "fullgraph": lambda v: isinstance(v, bool),
    "dynamic": lambda v: v is None or isinstance(v, bool),
    "backend": lambda v: isinstance(v, str) and v != "",
    "options": lambda v: isinstance(v, dict),
}


def _compile_options(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    if not isinstance(v, dict) or ("mode" in v and "options" in v):  # torch.compile takes one or the other.
        return False
    return all(k in COMPILE_OPTIONS and COMPILE_OPTIONS[k](x) for k, x in v.items())


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    must: str  # "key 'x': must be <must> (got <value>)"
    hint: str = ""  # Said after that: what to set instead.


_OFF = "null turns it off"
_NO_VARS = "write the path out (run_dir unset uses RUN_DIR or the settings file)"


def _no_variable(value: Any) -> bool:
    return re.search(r"\$[A-Za-z_]", str(value)) is None


RULES: dict[type, dict[str, Rule]] = {
    Config: {
        # null: the task's `get_batch_size()` gives it (mlfab 0.2).
        "batch_size": Rule(_or_null(_at_least(1)), "an integer >= 1, or null for the task's get_batch_size()"),
        "num_dataloader_workers": Rule(_at_least(0), "an integer >= 0", "0 loads data in the training process"),
        "learning_rate": Rule(_positive, "a number > 0"),
        "betas": Rule(lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        "weight_decay": Rule(lambda v: _number(v) and v >= 0, "a number >= 0"),
        "warmup_steps": Rule(_at_least(0), "an integer >= 0"),
        "clip_grad_norm": Rule(_or_null(_positive), "a number > 0 or null", "null disables clipping"),
        "batches_per_step": Rule(_at_least(1), "an integer >= 1", "1 accumulates no gradients"),
        "max_steps": Rule(_or_null(_at_least(1)), "an integer >= 1 or null", "null trains until stopped"),
        "valid_every_n_steps": Rule(_or_null(_at_least(1)), "an integer >= 1 or null", _OFF),
        "valid_every_n_seconds": Rule(_or_null(_positive), "a number > 0 or null", _OFF),
        "valid_first_n_seconds": Rule(
            _or_null(_positive), "a number > 0 or null", "null validates after the first step"
        ),
        "valid_batches": Rule(_at_least(0), "an integer >= 0", "0 turns validation off"),
        "save_every_n_steps": Rule(_or_null(_at_least(1)), "an integer >= 1 or null", _OFF),
        "save_every_n_seconds": Rule(_or_null(_positive), "a number > 0 or null", _OFF),
        "keep_last_n_checkpoints": Rule(
            _at_least(1),
            "an integer >= 1",
            "for no periodic checkpoints, set save_every_n_steps and save_every_n_seconds to null",
        ),
        "max_bad_samples_in_a_row": Rule(_or_null(_at_least(1)), "an integer >= 1 or null", "null never stops"),
        "max_nonfinite_steps_in_a_row": Rule(_or_null(_at_least(1)), "an integer >= 1 or null", "null never stops"),
        "diagnostics": Rule(
            lambda v: all(d in typing.get_args(Diagnostic) for d in v),
            "a list of " + ", ".join(typing.get_args(Diagnostic)),
            "[] logs none",
        ),
        "compile": Rule(
            _compile_options,
            "true, false, or a mapping of " + ", ".join(COMPILE_OPTIONS) + " (mode or options, not both)",
            "e.g. compile='{mode: max-autotune}'; modes: " + ", ".join(m for m in COMPILE_MODES if m),
        ),
        "accelerator": Rule(lambda v: v in ACCELERATORS, "one of " + ", ".join(ACCELERATORS)),
        "strategy": Rule(  # Read when checked: a strategy a user registers counts.
            lambda v: v.lower() == "auto" or v.lower() in StrategyRegistry.available_strategies(),  # As Lightning.
            "auto or a strategy name Lightning knows (ddp, ddp_spawn, fsdp, deepspeed, ...: "
            "lightning.pytorch.strategies.StrategyRegistry)",
        ),
        "devices": Rule(
            lambda v: (_integer(v) and v >= 1) or _matches(_DEVICES)(v),
            "a number >= 1, auto, or GPU indices like '0,1'",
        ),
        "num_nodes": Rule(_at_least(1), "an integer >= 1"),
        "seed": Rule(lambda v: _integer(v) and 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
        # A shell expands `$RUN_DIR` on its command line, never in a file: the runs went to a folder `$RUN_DIR`.
        "exp_dir": Rule(_or_null(_no_variable), "a path without $VARIABLES, which mlfab does not expand", _NO_VARS),
        "run_dir": Rule(_or_null(_no_variable), "a path without $VARIABLES, which mlfab does not expand", _NO_VARS),
    },
    SlurmConfig: {
        "nodes": Rule(_at_least(1), "an integer >= 1"),
        "gpus_per_node": Rule(_at_least(0), "an integer >= 0", "0 makes a CPU job"),
        "cpus_per_task": Rule(_at_least(1), "an integer >= 1"),
        "mem": Rule(
            _or_null(_matches(r"\d+[KMGT]?", re.IGNORECASE)), "an amount as sbatch --mem takes it (64G, 500M) or null"
        ),
        "time": Rule(
            _or_null(_matches(_SLURM_TIME, re.IGNORECASE)),
            "a time limit as sbatch --time takes it (D-HH:MM:SS, HH:MM:SS, minutes) or null",
        ),
        "partition": Rule(_or_null(_matches(r'[^\s"]+')), "a partition name without spaces or quotes, or null"),
        "account": Rule(_or_null(_matches(r'[^\s"]+')), "an account name without spaces or quotes, or null"),
        "signal_seconds": Rule(lambda v: _integer(v) and 1 <= v <= 65535, "an integer from 1 to 65535"),
        "extra_sbatch_lines": Rule(
            lambda v: all(isinstance(line, str) and "\n" not in line for line in v),
            "a list of one-line sbatch options, like ['--qos=high']",
        ),
        "python": Rule(_or_null(lambda v: isinstance(v, str) and v.strip() != ""), "an interpreter path or null"),
    },
}


@functools.cache
def rules_for(cls: type) -> dict[str, Rule]:
    """The rules of `cls`'s fields: its bases' in `RULES`, for each field it declares with the base's type."""
    own = field_types(cls)
    found: dict[str, Rule] = {}
    for base, rules in RULES.items():
        if issubclass(cls, base):
            base_types = field_types(base)
            found.update({k: r for k, r in rules.items() if k in own and _keeps(own[k], base_types[k])})
    return found


def _keeps(own: Any, base: Any) -> bool:
    """Whether a field typed `own` in a subclass keeps the base's type `base`: the same, or without its None
    (`batch_size: int` over `int | None`)."""
    args = typing.get_args(base)
    rest = tuple(a for a in args if a is not type(None))
    return own == base or (len(rest) < len(args) and own == typing.Union[rest])  # noqa: UP007 - built from a tuple


def _rule_problem(cls: type, key: str, value: Any, prefix: str, shown: Any) -> str | None:
    """The problem with `value` for `cls`'s field `key`, if its rule refuses it, showing `shown` (the value as
    given, before jsonargparse read it)."""
    rule = rules_for(cls).get(key)
    if rule is None:
        return None
    try:
        ok = bool(rule.check(value))
    except (TypeError, ValueError):  # A value of another type than the rule's (set in Python, unchecked).
        ok = False
    if ok:
        return None
    shown = plain_data(shown)  # A tuple as the list it is typed as.
    return f"key {prefix + key!r}: must be {rule.must} (got {shown!r})" + (f"; {rule.hint}" if rule.hint else "")


def value_problems(config: Any, prefix: str = "", given: Any = None) -> list[str]:
    """Every value of a config instance (nested configs included) outside its rule's range, by dotted key; a value
    found in `given` (the plain data it was built from) is shown as given there."""
    if not _is_instance(config):
        return []
    given = given if isinstance(given, Mapping) else {}
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_instance(value):
            problems.extend(value_problems(value, f"{prefix}{f.name}.", given.get(f.name)))
        elif found := _interpolations(value, prefix + f.name):  # mlfab 0.2 resolved them: never kept as text.
            problems.extend(
                f"key {key!r}: {text!r} is an OmegaConf interpolation, which mlfab configs do not resolve (mlfab 0.2 "
                "did); give the value itself, or derive it from the other key in the task"
                for key, text in found
            )
        elif (problem := _rule_problem(type(config), f.name, value, prefix, given.get(f.name, value))) is not None:
            problems.append(problem)
    return problems


def _interpolations(value: Any, key: str) -> list[tuple[str, str]]:
    """(key, text) of each string in `value` that holds `${...}`, inside lists and mappings too (`paths[0]`,
    `extra.k`)."""
    if isinstance(value, str):
        return [(key, value)] if "${" in value else []
    if isinstance(value, Mapping):
        return [found for k, v in value.items() for found in _interpolations(v, f"{key}.{k}")]
    if isinstance(value, list | tuple):
        return [found for i, v in enumerate(value) for found in _interpolations(v, f"{key}[{i}]")]
    return []


def check_config(config: Any, prefix: str = "", given: Any = None) -> None:
    """Raises a ConfigError listing every value of `config` (a Config built in Python, say) outside its range."""
    problems = value_problems(config, prefix, given)
    if problems:
        raise ConfigError(problems_message(type(config).__name__, problems))


# ---------------------------------------------------------------------------------------------------------------------
# Plain data: YAML files, dataclasses and dicts as nested dicts.


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` then a key of its own overrides.
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice: remove one",
                    key_node.start_mark,
                )  # fmt: skip
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a safe loader
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
    if _is_instance(source) or isinstance(source, Mapping):
        return plain_data(source)
    if isinstance(source, str | Path):
        return load_yaml(source)
    raise ConfigError(f"Cannot use {source!r} as a config: give a Config dataclass, a dict or a YAML file path.")


def _is_instance(value: Any) -> bool:
    """Whether `value` is a dataclass instance (`dataclasses.is_dataclass` is also true of the class)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def plain_data(value: Any) -> Any:
    if _is_instance(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def merge(base: Mapping[str, Any], over: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """`over` laid over a copy of `base`: mappings merge key by key. For config data of `cls`, as the command line
    lays a later source over an earlier one: only a nested config (a dataclass field, e.g. `slurm`) merges; any
    other value, a mapping such as `compile` too, is replaced whole."""
    out, types = dict(base), field_types(cls) if cls is not None else {}
    for key, value in over.items():
        sub = dataclass_type(types.get(key))
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and (cls is None or sub is not None):
            out[key] = merge(out[key], value, sub)
        else:
            out[key] = value
    return out


def merge_sources(cls: type, *sources: Any) -> dict[str, Any]:
    """Dataclasses, dicts and YAML files (of config keys of `cls`) as one nested dict, later ones winning."""
    return functools.reduce(lambda base, over: merge(base, over, cls), map(to_dict, sources), {})


def show(value: Any) -> str:
    """A value as it is typed on the command line (YAML): null, [0.9, 0.999], auto."""
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    except yaml.YAMLError:
        return repr(value)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------------
# Checking: plain data -> a typed config, or one error listing every problem.


def resolve_config(cls: type[ConfigT], *sources: Any) -> ConfigT:
    return build_config(cls, merge_sources(cls, *sources))


def build_config(cls: type[ConfigT], data: Mapping[str, Any], prefix: str = "") -> ConfigT:
    """The typed config for plain data, built and checked by jsonargparse as the command line does, and its values
    checked against `RULES`. A ConfigError lists every problem, each key named with `prefix` before it."""
    parser = _parser(typing.cast(Any, cls))  # A class is hashable; mypy does not see it for a type variable.
    try:
        if any(_required(f) and f.name not in data for f in dataclasses.fields(cls)):  # (jsonargparse: None.)
            raise ValueError("a required key is missing")  # A field typed `X | None` without default is required.
        config = parser.instantiate(parser.parse_object({"config": dict(data)})).config
    except (jsonargparse.ArgumentError, TypeError, ValueError) as e:
        raise ConfigError(problems_message(cls.__name__, config_problems(cls, data, prefix) or [str(e)])) from None
    check_config(config, prefix, given=data)
    return config


@functools.cache
def _parser(tp: Any) -> jsonargparse.ArgumentParser:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", type=tp)
    return parser


def problems_message(name: str, problems: Sequence[str]) -> str:
    listing = "\n".join(f"  - {p}" for p in problems)
    return f"Invalid config for {name} ({len(problems)} problem(s)):\n{listing}"


def config_problems(cls: type, data: Mapping[str, Any], prefix: str = "", rules: bool = True) -> list[str]:
    """Every unknown key (with close matches), missing required key, value of the wrong type and (with `rules`)
    value outside its rule's range in `data`."""
    ftypes = field_types(cls)
    problems = []
    for key, value in data.items():
        if key not in ftypes:
            close = difflib.get_close_matches(str(key), list(ftypes), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            problems.append(f"unknown key {prefix + str(key)!r}{hint}")
        elif (sub := dataclass_type(ftypes[key])) is not None and isinstance(value, Mapping):
            problems.extend(config_problems(sub, value, prefix=f"{prefix}{key}.", rules=rules))
        elif (why := _type_problem(ftypes[key], value)) is not None:
            problems.append(f"key {prefix + key!r}: {why}")
        elif rules:  # Checked as jsonargparse reads it (`"1e-3"` -> 0.001, a list -> a tuple), shown as given.
            parsed = _parser(ftypes[key]).parse_object({"config": value}).config
            if (problem := _rule_problem(cls, key, parsed, prefix, value)) is not None:
                problems.append(problem)
    for f in dataclasses.fields(cls):
        if _required(f) and f.name not in data:
            key = prefix + f.name
            problems.append(f"missing required key {key!r}: set it in the config or pass {key}=<value>")
    return problems


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its `default_factory` called), or `dataclasses.MISSING` where it has none."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def away_from_defaults(cls: type, data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The values of config data of `cls` (a script's `launch()` config) that are not its defaults, by dotted key."""
    fields, types, out = {f.name: f for f in dataclasses.fields(cls)}, field_types(cls), {}
    for key, value in data.items():
        sub = dataclass_type(types.get(key))
        if sub is not None and isinstance(value, Mapping):
            out.update(away_from_defaults(sub, value, f"{prefix}{key}."))
        elif key not in fields or plain_data(field_default(fields[key])) != plain_data(value):
            out[prefix + key] = value
    return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_problem(tp: Any, value: Any) -> str | None:
    """None when jsonargparse accepts `value` for `tp`; else what was expected (for a tuple or list, of which
    items, or how many) and what was given."""
    if _accepts(tp, value):
        return None
    expected = type_name(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list) and args and isinstance(value, list | tuple):
        per_item = list(args) if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        if len(per_item) != len(value):
            return f"expected {len(per_item)} items ({expected}), got {len(value)}: {value!r}"
        bad = [
            f"item {i}: expected {type_name(t)}"
            for i, (t, v) in enumerate(zip(per_item, value, strict=True))
            if not _accepts(t, v)
        ]
        if bad:
            expected += "; " + ", ".join(bad)
    return f"expected {expected} (got {value!r})"


def _accepts(tp: Any, value: Any) -> bool:
    try:
        _parser(tp).parse_object({"config": value})
    except jsonargparse.ArgumentError:
        return False
    return True


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> type, with string annotations (`from __future__ import annotations`) evaluated."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # An annotation that cannot be evaluated: fall back to what the dataclass holds.
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def dataclass_type(tp: Any) -> type | None:
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
