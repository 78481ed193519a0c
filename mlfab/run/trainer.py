"""The Lightning Trainer an mlfab config maps to (the mapping table in design.md), with mlfab's callbacks."""

import dataclasses
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mlfab._lightning import no_profiler
from mlfab.checkpoints import AtomicCheckpointIO, periodic_name
from mlfab.config import Config, field_default, problems_message
from mlfab.errors import ConfigError
from mlfab.run.async_save import BackgroundCheckpointIO
from mlfab.run.callbacks import (
    CheckpointsInRun,
    FinalCheckpoint,
    GracefulStop,
    PeriodicCheckpoint,
    TrainingEndsOnError,
    ValidationCadence,
)
from mlfab.run.diagnostics import Diagnostics
from mlfab.run.distributed import available_accelerators, resolve_hardware
from mlfab.run.quiet import SummaryAfterHeader
from mlfab.run.slurm import cluster_environment

# Lightning needs an int `val_check_interval` for endless data; this one never comes due.
NEVER = 2**62


def resolve_precision(precision: str, accelerator: str | None = None) -> str:
    """The Trainer's precision on `accelerator` (as `resolve_hardware` resolved it; None: the one accelerator=auto
    picks here). A ConfigError for one it cannot train in: Lightning would switch 16-mixed on CPU to bf16-mixed with
    only a warning, while config.yaml said 16-mixed."""
    accelerator = accelerator or available_accelerators()[0]
    if precision == "auto":
        return "bf16-mixed" if accelerator == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    if precision == "16-mixed" and accelerator == "cpu":
        raise ConfigError(
            "precision=16-mixed (fp16 mixed precision) needs a GPU, and this run's accelerator is cpu. On the CPU set "
            "precision to one of bf16-mixed, 32-true, bf16-true, 16-true, 64-true (or auto), or set accelerator=cuda "
            "on a machine with GPUs."
        )
    return precision


# The config keys only a Trainer built by mlfab reads (`trainer_kwargs`, `trainer_callbacks`, `checkpoint_io`);
# tests/test_cadence_and_hardware.py checks that these are exactly the keys those functions read.
TRAINER_KEYS = (
    "max_steps", "batches_per_step", "clip_grad_norm", "valid_every_n_steps", "valid_every_n_seconds",
    "valid_first_n_seconds", "valid_batches", "save_every_n_steps", "save_every_n_seconds", "keep_last_n_checkpoints",
    "async_checkpoints", "diagnostics", "accelerator", "devices", "num_nodes", "strategy", "precision",
)  # fmt: skip


PERIODIC_PREFIXES = {"save_every_n_steps": "step_", "save_every_n_seconds": "time_step_"}
PERIODIC_NAME = periodic_name(*PERIODIC_PREFIXES.values())


def is_periodic(path: Path) -> bool:
    """Whether a checkpoint file is one of the periodic cadences' (`step_00000010.ckpt`, `time_step_...`)."""
    return PERIODIC_NAME.fullmatch(path.name) is not None


def checkpoint_io(config: Config) -> AtomicCheckpointIO | BackgroundCheckpointIO:
    """The Trainer's checkpoint IO: atomic writes with a checksum, keep_last pruning, and with `async_checkpoints` the
    periodic checkpoints written in a background thread (mlfab/run/async_save.py). The newest N periodic checkpoints
    of each cadence are kept, counted over the files in the directory, so that a relaunch honours
    keep_last_n_checkpoints too."""
    n = config.keep_last_n_checkpoints
    atomic = AtomicCheckpointIO(
        {prefix: n for key, prefix in PERIODIC_PREFIXES.items() if getattr(config, key) and n > 0}
    )
    return BackgroundCheckpointIO(atomic, background=is_periodic) if config.async_checkpoints else atomic


def trainer_callbacks(config: Config, exp_dir: Path) -> list[Any]:
    """mlfab's callbacks for a config: validation cadence, Ctrl-C, periodic and final checkpoints, the model
    summary shown after mlfab's header, the diagnostics (mlfab/run/diagnostics.py) and `on_training_end` on errors."""
    ckpt_dir = exp_dir / "checkpoints"

    def periodic(key: str, **cadence: Any) -> PeriodicCheckpoint:
        return PeriodicCheckpoint(
            filename=PERIODIC_PREFIXES[key] + "{step:08.0f}",
            monitor="step",
            mode="max",
            save_top_k=config.keep_last_n_checkpoints,
            dirpath=ckpt_dir,
            auto_insert_metric_name=False,
            # A name that exists is a checkpoint of the same step from before a resume (from an older checkpoint, or
            # one written past the one resumed from): overwrite it rather than add `-v1`. (The `-v1` every resume
            # wrote came from saves mid-accumulation, which PeriodicCheckpoint no longer makes.)
            enable_version_counter=False,
            # Saved where the cadence says, epoch end or not: Lightning otherwise puts off a save at an epoch's last
            # batch until a validation it expects to follow, which mlfab's cadence need not run (the file was lost).
            save_on_train_epoch_end=True,
            **cadence,
        )

    callbacks: list[Any] = [
        CheckpointsInRun(ckpt_dir),
        ValidationCadence(
            config.valid_every_n_seconds,
            config.valid_first_n_seconds,
            every_n_steps=config.valid_every_n_steps,
            lightning_interval=val_check_interval(config, config.batches_per_step),
        ),
        GracefulStop(),
        SummaryAfterHeader(),
    ]
    if config.diagnostics:
        callbacks.append(Diagnostics(config.diagnostics))
    if config.save_every_n_steps:
        callbacks.append(periodic("save_every_n_steps", every_n_train_steps=config.save_every_n_steps))
    if config.save_every_n_seconds:
        seconds = timedelta(seconds=config.save_every_n_seconds)
        callbacks.append(periodic("save_every_n_seconds", train_time_interval=seconds))
    callbacks.append(FinalCheckpoint(ckpt_dir / "last.ckpt"))
    # `on_training_end` after an exception; `Task.setup` moves it to the end of the Trainer's callbacks (and adds one
    # to any Trainer that has none), this one is there even for a task whose `setup` does not call super's.
    callbacks.append(TrainingEndsOnError())
    return callbacks


def built_by_mlfab(trainer: pl.Trainer) -> bool:
    return any(isinstance(c, ValidationCadence) for c in trainer.callbacks)  # type: ignore[attr-defined]


# The config keys only mlfab's dataloaders read (`Task.train_dataloader`, ...): not a LightningDataModule's.
DATA_KEYS = ("batch_size", "num_dataloader_workers", "max_bad_samples_in_a_row")


def unread_settings(config: Config, keys: tuple[str, ...] = (*TRAINER_KEYS, "exp_dir", "run_dir")) -> list[str]:
    """`key=value` of each of `keys` that `config` sets to something else than its class's default: by default the
    `TRAINER_KEYS` (and `exp_dir` / `run_dir`: mlfab's pipeline picks the run directory), what a Trainer built
    elsewhere would not do."""
    out = []
    for f in dataclasses.fields(config):
        if f.name not in keys:
            continue
        default = field_default(f)
        if default is not dataclasses.MISSING and getattr(config, f.name) != default:
            out.append(f"{f.name}={getattr(config, f.name)!r}")
    return out


def unseeded(config: Config) -> int | None:
    """The config's seed where it is not its class's default and torch's generator was not seeded with it: mlfab's
    pipeline seeds before the task is built, a Trainer of the user's own (or `build_trainer`'s) never does."""
    (f,) = (f for f in dataclasses.fields(config) if f.name == "seed")
    return config.seed if config.seed != field_default(f) and torch.initial_seed() != config.seed else None


def val_check_interval(config: Config, batches_per_step: int) -> int:
    """The Trainer's `val_check_interval` for `valid_every_n_steps`, scaled by the accumulation, as a record: an epoch
    that ends part-way through an accumulation makes Lightning's batch count drift from the optimizer steps, so
    `ValidationCadence` counts the steps itself while the Trainer has this value (not one given with `--trainer`)."""
    return config.valid_every_n_steps * batches_per_step if config.valid_every_n_steps else NEVER


def trainer_kwargs(config: Config) -> dict[str, Any]:
    """The Lightning Trainer arguments a config maps to (the mapping table in design.md)."""
    k = config.batches_per_step
    hardware = resolve_hardware(config.accelerator, config.devices, config.num_nodes, config.strategy)
    return {
        **hardware,
        "precision": resolve_precision(config.precision, hardware["accelerator"]),
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "max_epochs": -1,
        "accumulate_grad_batches": k,
        "gradient_clip_val": config.clip_grad_norm,
        "gradient_clip_algorithm": "norm",
        "val_check_interval": val_check_interval(config, k),
        "check_val_every_n_epoch": None,
        "limit_val_batches": config.valid_batches,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
    }


def trainer_settings(
    config: Config,
    exp_dir: Path,
    loggers: Any,
    extra_callbacks: Sequence[Any] = (),
    extra_plugins: Sequence[Any] = (),
) -> dict[str, Any]:
    """Every Trainer argument of an mlfab run; the Lightning CLI lays explicitly given `--trainer.*` over it."""
    callbacks = [*trainer_callbacks(config, exp_dir), *extra_callbacks]
    # Under Slurm, Lightning's own environment would save from inside its SIGUSR1 handler: mlfab's does
    # it at the step boundary (GracefulStop), so Lightning's requeue handling is switched off.
    env = cluster_environment()
    return {
        **trainer_kwargs(config),
        "plugins": [checkpoint_io(config), *([env] if env is not None else []), *extra_plugins],
        "logger": loggers,
        "callbacks": callbacks,
        "profiler": no_profiler(),
        "default_root_dir": exp_dir,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }


def build_trainer(config: Config, exp_dir: Path, loggers: list[Any], extra_callbacks: Sequence[Any] = ()) -> Any:
    return pl.Trainer(**trainer_settings(config, exp_dir, loggers, extra_callbacks))


def refuse_under_manual_optimization(task: Any, clip: Any, accumulate: Any) -> None:
    """Under Lightning's manual optimization (`automatic_optimization = False`) the task's `training_step` steps its
    optimizers itself: the settings mlfab applies around an automatic step would be refused by Lightning naming
    Trainer arguments the user never gave, or never apply. All of them at once, named as the config names them."""
    if task.automatic_optimization:
        return
    problems = []
    if clip is not None:  # The Trainer's gradient_clip_val.
        problems.append(
            "key 'clip_grad_norm' (or --trainer.gradient_clip_val): set it to null and clip in training_step "
            "(self.clip_gradients(optimizer, gradient_clip_val=...))"
        )
    if (accumulate or 1) > 1:  # Its accumulate_grad_batches.
        problems.append("key 'batches_per_step': set it to 1 and accumulate in training_step")
    if getattr(task.config, "warmup_steps", 0):
        problems.append("key 'warmup_steps': set it to 0 and set the rate in training_step (nothing would warm up)")
    if problems:
        name = f"{type(task).__name__} (automatic_optimization=False: its training_step steps the optimizers)"
        raise ConfigError(problems_message(name, problems))
