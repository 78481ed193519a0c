"""`Task.launch`: resolve the config, make the run directory, build the Lightning Trainer, and fit.

Command line (mlfab style): `python -m examples.mnist [config.yaml ...] [key=value ...] [--help]`.
"""

import os
import re
import sys
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
    callbacks: list[Any] = [ValidationCadence(config.valid_every_n_seconds), GracefulStop()]
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
    k = config.batches_per_step
    return {
        "accelerator": "auto",
        "devices": 1,
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


def print_help(task_cls: type["Task"]) -> None:
    import dataclasses

    from mlfab.config import field_help

    config_cls = task_cls.config_class()
    print(f"usage: python {sys.argv[0]} [config.yaml ...] [key=value ...]\n")
    print(f"Train {task_cls.__name__}. Later arguments override earlier ones; dotted keys set nested fields.\n")
    print("config keys:")
    for f in dataclasses.fields(config_cls):
        default = "(required)" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        )
        tp = getattr(f.type, "__name__", None) or str(f.type)
        print(f"  {f.name} ({tp}, default: {default})\n      {field_help(f)}")


def parse_argv(task_cls: type["Task"], argv: list[str]) -> list[Any]:
    """YAML paths and key=value overrides, in order. A bare file name is also found next to the task's source."""
    import inspect

    sources: list[Any] = []
    for arg in argv:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(task_cls)
        raise SystemExit(0)
    config = resolve_config(task_cls.config_class(), *configs, *parse_argv(task_cls, argv))
    code = run(task_cls, config)
    if code:
        raise SystemExit(code)


def run(task_cls: type["Task"], config: Config) -> int:
    """Trains `task_cls` with a resolved config; returns the process exit code (130 after Ctrl-C)."""
    import lightning.pytorch as pl

    from mlfab.callbacks import GracefulStop
    from mlfab.checkpoints import check_compatible, load_checkpoint
    from mlfab.provenance import write_provenance

    pl.seed_everything(config.seed, workers=True, verbose=False)
    exp_dir = new_exp_dir(task_cls, config)
    resume_from = newest_checkpoint(exp_dir)
    (exp_dir / "config.yaml").write_text(config_to_yaml(config))
    task = task_cls(config)
    task._exp_dir = exp_dir
    if resume_from is not None:
        check_compatible(load_checkpoint(resume_from), resume_from, task)
    write_provenance(exp_dir, task_cls, resumed=resume_from is not None)
    task.set_loggers()
    trainer = build_trainer(config, exp_dir, task._mlfab_loggers, [])
    for logger in task._mlfab_loggers:
        if hasattr(logger, "write_config"):
            logger.write_config(config_to_yaml(config))
    print(f"Run directory: {exp_dir}", flush=True)
    if resume_from is not None:
        print(f"Resuming from {resume_from}", flush=True)
    trainer.fit(task, ckpt_path=resume_from)
    print(f"Finished. Run directory: {exp_dir}", flush=True)
    stop = next(c for c in trainer.callbacks if isinstance(c, GracefulStop))  # type: ignore[attr-defined]
    return 128 + stop.signal_received if stop.signal_received else 0
