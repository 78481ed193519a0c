"""`Task.launch`: resolve the config, make the run directory, build the Lightning Trainer, and fit.

Command line (mlfab style): `python -m examples.mnist [config.yaml ...] [key=value ...] [--help]`.
"""

import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlfab.config import Config, config_to_yaml, parse_override, resolve_config
from mlfab.errors import ConfigError
from mlfab.settings import default_run_dir

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from mlfab.task import Task

# Lightning needs an int `val_check_interval` for endless data; this one never comes due.
NEVER = 2**62

# A first argument naming one of these runs Lightning's CLI (mlfab.cli) instead of the mlfab form.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def new_exp_dir(task_cls: type, config: Config) -> Path:
    """`<run_dir>/<snake_case task name>/run_<N>` with the next unused N, or `exp_dir` when given."""
    if config.exp_dir:
        path = Path(config.exp_dir).expanduser()
    else:
        root = (Path(config.run_dir).expanduser() if config.run_dir else default_run_dir()) / snake_case(
            task_cls.__name__
        )
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
        n = max(taken, default=-1) + 1
        while True:  # Two launches at once: the one that creates the directory first gets it.
            path = root / f"run_{n}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                n += 1
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the run directory {path} ({e.strerror}). Set run_dir or exp_dir.") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"The run directory {path} is not writable. Fix its permissions, or set run_dir or exp_dir "
                          "to a directory you can write to.")
    return path.resolve()


def agreed_exp_dir(task_cls: type, config: Config) -> tuple[Path, bool]:
    """(run directory, whether this process writes its files): one directory for every rank of a run.

    Rank zero creates it and passes it on to the processes Lightning starts (through the environment);
    ranks started by torchrun, Slurm or by hand without `exp_dir` take rank zero's once the process
    group exists (`Task.setup`), and meanwhile write nothing."""
    from mlfab.distributed import EXP_DIR_ENV, env_rank_zero

    if EXP_DIR_ENV in os.environ:
        return Path(os.environ[EXP_DIR_ENV]), False
    if not env_rank_zero():
        if config.exp_dir:
            return Path(config.exp_dir).expanduser().resolve(), False
        import tempfile

        return Path(tempfile.mkdtemp(prefix="mlfab-rank-")), False
    return new_exp_dir(task_cls, config), True


def newest_checkpoint(exp_dir: Path) -> Path | None:
    """The checkpoint a relaunch into `exp_dir` resumes from: the most recently written one."""
    from mlfab.checkpoints import checkpoint_files

    files = checkpoint_files(exp_dir / "checkpoints")
    return files[-1] if files else None


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def trainer_callbacks(config: Config, exp_dir: Path) -> list[Any]:
    """mlfab's callbacks for a config: validation cadence, Ctrl-C, periodic and final checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mlfab.callbacks import FinalCheckpoint, GracefulStop, ValidationCadence

    ckpt_dir = exp_dir / "checkpoints"
    periodic = {"monitor": "step", "mode": "max", "save_top_k": config.keep_last_n_checkpoints,
                "dirpath": ckpt_dir, "auto_insert_metric_name": False}
    callbacks: list[Any] = [ValidationCadence(config.valid_every_n_seconds, config.valid_first_n_seconds),
                            GracefulStop()]
    if config.save_every_n_steps:
        callbacks.append(ModelCheckpoint(filename="step_{step:08.0f}", every_n_train_steps=config.save_every_n_steps,
                                         **periodic))
    if config.save_every_n_seconds:
        callbacks.append(ModelCheckpoint(filename="time_step_{step:08.0f}",
                                         train_time_interval=timedelta(seconds=config.save_every_n_seconds),
                                         **periodic))
    callbacks.append(FinalCheckpoint(ckpt_dir / "last.ckpt"))
    return callbacks


def trainer_kwargs(config: Config) -> dict[str, Any]:
    """The Lightning Trainer arguments a config maps to (the mapping table in design.md)."""
    from mlfab.distributed import resolve_hardware

    k = config.batches_per_step
    return {
        **resolve_hardware(config.accelerator, config.devices, config.num_nodes, config.strategy),
        "precision": resolve_precision(config.precision),
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "max_epochs": -1,
        "accumulate_grad_batches": k,
        "gradient_clip_val": config.clip_grad_norm,
        "gradient_clip_algorithm": "norm",
        # Lightning counts batches, not optimizer steps: scale by the accumulation.
        "val_check_interval": config.valid_every_n_steps * k if config.valid_every_n_steps else NEVER,
        "check_val_every_n_epoch": None,
        "limit_val_batches": config.valid_batches,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
    }


def build_trainer(config: Config, exp_dir: Path, loggers: list[Any], extra_callbacks: list[Any]) -> "pl.Trainer":
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mlfab.checkpoints import AtomicCheckpointIO

    callbacks = [*trainer_callbacks(config, exp_dir), *extra_callbacks]
    return pl.Trainer(
        **trainer_kwargs(config),
        plugins=[AtomicCheckpointIO()],
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=exp_dir,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def command_name() -> str:
    """How the user started this program, for messages: `python -m examples.mnist` or `python train.py`."""
    if Path(sys.argv[0]).name == "mlfab":
        return "mlfab"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {Path(sys.argv[0]).name}" if sys.argv and sys.argv[0] else "python my_script.py"


def _show(value: Any) -> str:
    """A value as it is typed on the command line (YAML): null, [0.9, 0.999], auto."""
    import yaml

    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    except yaml.YAMLError:
        return repr(value)


def _help_rows(cls: type, script: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """`name (type, default: ...)` and the help text of every field, nested dataclass fields by dotted name. The
    default is the script's (class defaults <- what it gives `launch`); `current` also has the arguments applied."""
    from dataclasses import MISSING, fields

    from mlfab.config import _dataclass_type, _field_types, field_help, merge, type_name

    rows = []
    for f in fields(cls):
        tp, name = _field_types(cls)[f.name], prefix + f.name
        default, value = script.get(f.name, MISSING), current.get(f.name, MISSING)
        sub = _dataclass_type(tp)
        if sub is not None and (value is MISSING or isinstance(value, dict)):
            sub_script = merge(_defaults(sub), default if isinstance(default, dict) else {})
            rows += _help_rows(sub, sub_script, merge(sub_script, value or {}), f"{name}.")  # type: ignore[arg-type]
            continue
        was = "required" if default is MISSING else f"default: {_show(default)}"
        shown = was if value == default else f"{was}, current: {_show(value)}"
        rows.append(f"  {name} ({type_name(tp)}, {shown})\n      {field_help(f)}")
    return rows


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults as plain data; required fields left out."""
    from dataclasses import MISSING, fields

    from mlfab.config import to_dict

    values = {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
              for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
    return to_dict(values)


def print_help(task_cls: type["Task"], configs: Sequence[Any] = (), argv: Sequence[str] = ()) -> None:
    """Every config key with its type, value and help text: the values after `configs` (what the script passes to
    `launch`) and the command-line arguments `argv` are applied."""
    from mlfab.config import merge, merge_sources

    cls = task_cls.config_class()
    script = merge(_defaults(cls), merge_sources(cls, *configs))
    current = merge(script, merge_sources(cls, *parse_argv(task_cls, list(argv))))
    cmd = command_name()
    print(f"usage: {cmd} [config.yaml ...] [key=value ...]\n"
          f"       {cmd} {{fit,validate,test,predict}} [--help] ...   (Lightning's CLI, see its --help)\n")
    print(f"Trains {task_cls.__name__}. The arguments apply in order, later ones winning, over the defaults shown: "
          "YAML files (a bare file name is also looked up next to the task's source file) and key=value (the value "
          "is read as YAML, so betas=[0.9,0.95] and max_steps=null work; dotted keys set nested fields).\n")
    print("config keys:")
    print("\n".join(_help_rows(cls, script, current, "")))


def parse_argv(task_cls: type["Task"], argv: list[str]) -> list[Any]:
    """YAML paths and key=value overrides, in order. A bare file name is also found next to the task's source."""
    import inspect

    sources: list[Any] = []
    for arg in argv:
        if arg.startswith("-"):
            key = arg.lstrip("-").partition("=")[0]
            raise ConfigError(
                f"Unknown option {arg!r}: this form takes YAML files and key=value arguments (e.g. {key}=...). "
                f"Flags such as --model.config.{key} and --trainer.{key} need a subcommand first, as in "
                f"`{command_name()} fit --model.config.{key} ...`; see `{command_name()} --help`."
            )
        if "=" in arg:
            sources.append(parse_override(arg))
            continue
        path = Path(arg)
        if not path.exists():
            try:
                beside = Path(inspect.getfile(task_cls)).parent / arg
            except (TypeError, OSError):
                beside = path
            if beside.exists():
                path = beside
            else:
                raise ConfigError(f"Config file {arg!r} not found (looked in the working directory and next to "
                                  f"{task_cls.__name__}'s source file). Pass key=value or an existing YAML file.")
        sources.append(path)
    return sources


def launch(task_cls: type["Task"], *configs: Any, launcher: Any = None, argv: list[str] | None = None) -> None:
    """`argv` (default: the command line) in the mlfab form, or Lightning's CLI when it starts with a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from mlfab.cli import run_cli  # Imports LightningCLI and jsonargparse: only when asked for.

        code = run_cli(task_cls, argv, configs)
    elif "--help" in argv or "-h" in argv:
        print_help(task_cls, configs, [a for a in argv if a not in ("--help", "-h")])
        raise SystemExit(0)
    else:
        code = run(task_cls, resolve_config(task_cls.config_class(), *configs, *parse_argv(task_cls, argv)))
    if code:
        raise SystemExit(code)


def run_file_text(task_cls: type, config: Config, trainer: dict[str, Any], path: Path,
                  extra: dict[str, Any] | None = None) -> str:
    """`config.yaml` of a run: LightningCLI's layout (so both `fit --config` and the mlfab form read it), the config
    in full and the Trainer arguments given explicitly; a header says how to rerun it and lists the Trainer
    settings that followed from the config."""
    import yaml

    from mlfab.config import to_dict

    cmd, module = command_name(), task_cls.__module__
    if module == "__main__" and cmd.startswith("python -m "):
        module = cmd.removeprefix("python -m ")
    lines = [f"# mlfab run config of {task_cls.__qualname__}: the config and the Trainer arguments given explicitly.",
             "# Train again with the same settings:"]
    if cmd != "mlfab":
        lines += [f"#   {cmd} {path}", f"#   {cmd} fit --config {path}"]
    if module != "__main__" and "<locals>" not in task_cls.__qualname__:
        lines.append(f"#   mlfab fit --model {module}.{task_cls.__qualname__} --config {path}")
    lines.append("# Trainer settings that followed from model.config (a `trainer` entry overrides its setting):")
    lines += [f"#   {k}: {_show(v)}" for k, v in trainer_kwargs(config).items() if k not in trainer]
    body = yaml.safe_dump({**(extra or {}), "model": {"config": to_dict(config)}, "trainer": trainer}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


def run(task_cls: type["Task"], config: Config) -> int:
    """Trains `task_cls` with a resolved config; returns the process exit code (130 after Ctrl-C)."""
    import lightning.pytorch as pl

    from mlfab.callbacks import GracefulStop
    from mlfab.checkpoints import check_compatible, load_checkpoint
    from mlfab.provenance import write_provenance

    pl.seed_everything(config.seed, workers=True, verbose=False)
    exp_dir, writer = agreed_exp_dir(task_cls, config)
    resume_from = newest_checkpoint(exp_dir)
    if writer:
        (exp_dir / "config.yaml").write_text(run_file_text(task_cls, config, {}, exp_dir / "config.yaml"))
    task = task_cls(config)
    task._exp_dir = exp_dir
    if resume_from is not None:
        check_compatible(load_checkpoint(resume_from), resume_from, task)
    if writer:
        write_provenance(exp_dir, task_cls, resumed=resume_from is not None)
    task.set_loggers()
    trainer = build_trainer(config, exp_dir, task._mlfab_loggers, [])
    for logger in task._mlfab_loggers:
        if hasattr(logger, "write_config"):
            logger.write_config(config_to_yaml(config))
    from mlfab.distributed import EXP_DIR_ENV

    if writer:
        print(f"Run directory: {exp_dir}", flush=True)
        if resume_from is not None:
            print(f"Resuming from {resume_from}", flush=True)
        os.environ[EXP_DIR_ENV] = str(exp_dir)  # For the processes Lightning's DDP launcher starts.
    try:
        trainer.fit(task, ckpt_path=resume_from)
    finally:
        if writer:
            os.environ.pop(EXP_DIR_ENV, None)
    if writer:
        print(f"Finished. Run directory: {exp_dir}", flush=True)
    stop = next(c for c in trainer.callbacks if isinstance(c, GracefulStop))  # type: ignore[attr-defined]
    return 128 + stop.signal_received if stop.signal_received else 0
