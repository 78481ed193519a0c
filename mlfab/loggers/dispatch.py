"""Writes resolved `Logs` to any Lightning logger: mlfab loggers natively, others through their own API.

Lightning's loggers have no common media call, so each known backend gets its native one. Plain loggers
(CSV and others) get scalars through `log_metrics`; a kind a logger cannot show is skipped with one
warning per logger type and kind. Single-stream loggers get the phase as a tag prefix (`valid/loss/loss`).
"""

import dataclasses
import warnings
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from mlfab._lightning import metric_prefix
from mlfab.loggers.base import MlfabLogger
from mlfab.loggers.tensorboard import verbatim, write_summaries
from mlfab.loggers.wandb import write_wandb
from mlfab.logs.buffer import Cadence, LogBuffer, due_loggers, lightning_logs_at
from mlfab.logs.values import Kind, Logs
from mlfab.state import LogPhase

_warned: set[tuple[str, str]] = set()  # (logger type, kind) already warned about.


def write_logs(logger: Any, logs: Logs, lightnings_own: Container[str] = ()) -> None:
    """`lightnings_own`: scalars Lightning's `self.log` gave a Lightning logger already (only mlfab's get them here)."""
    if isinstance(logger, MlfabLogger):
        logger.write(logs)
        return
    if lightnings_own and logs.scalars:
        scalars = {k: v for k, v in logs.scalars.items() if k not in lightnings_own}
        logs = dataclasses.replace(logs, values={**logs.values, "scalar": scalars})
    prefix = f"{logs.phase}/"
    if isinstance(logger, TensorBoardLogger | WandbLogger):  # Their native calls show every kind.
        # Past their `log_metrics`, which adds their `prefix=` to `self.log` values: add it here too.
        prefix = metric_prefix(logger) + prefix
        (write_summaries if isinstance(logger, TensorBoardLogger) else write_wandb)(logger.experiment, logs, prefix)
        return
    if logs.scalars:
        logger.log_metrics({prefix + k: v for k, v in logs.scalars.items()}, step=logs.step)
    for kind, values in logs.values.items():
        if values and kind != "scalar" and (type(logger).__name__, kind) not in _warned:
            _warned.add((type(logger).__name__, kind))
            warnings.warn(
                f"{type(logger).__name__} cannot show logged {kind} values; they are skipped for this logger. "
                "Add mlfab.TensorboardLogger or another logger that supports them.",
                stacklevel=1,
            )


def write_run_info(loggers: list[Any], config_yaml: str, provenance: str, exp_dir: Path) -> None:
    """Once per run: the config and where the run came from, as text wherever a logger can show text; the git diff
    and source come from the provenance folder."""
    info = {"config": config_yaml, "provenance": provenance}
    prov = exp_dir / "provenance"
    for name, pattern in (("git_diff", "git*.txt"), ("source", "source*/*")):
        records = sorted((p for p in prov.glob(pattern) if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
        if records:  # The most recently written one.
            info[name] = records[-1].read_text()
    for logger in loggers:
        if isinstance(logger, MlfabLogger):
            logger.write_run_info(info)
        elif isinstance(logger, TensorBoardLogger):
            for name, text in info.items():
                logger.experiment.add_text(f"{metric_prefix(logger)}run/{name}", verbatim(text), 0)


def flush_logs(
    trainer: Any,
    buffer: LogBuffer,
    cadence: Cadence,
    *,
    phase: LogPhase,
    step: int,
    elapsed_time_s: float,
    num_samples: int,
    publish: Callable[[LogPhase, dict[str, float], dict[str, Any]], dict[str, float]],
    lightnings_own: Container[str] = (),
    everywhere: bool = False,
) -> Callable[[], None] | None:
    """Writes the buffer to the loggers that are due (rank zero only), then clears it.

    `publish(phase, means, weights)` hands the scalars to Lightning's metrics (`trainer.callback_metrics`) and
    returns the values to write. Validation and test scalars are resolved at every evaluation, on every rank, and
    published there, where they are averaged over ranks weighted by their sample counts (a collective: every rank
    comes here and logs the same keys). Training scalars stay lazy: they are resolved and published only on rank
    zero, at the steps a logger writes or, with no logger attached, every `log_every_n_steps` steps; `everywhere`
    makes every logger write this step, whatever its cadence (the last training step, one a validation follows, and
    the validation that ends training).

    Returns, for a validation that some loggers skipped (their write interval), a call that writes it to them: run
    where training ends, since a callback (EarlyStopping) may end it on this validation after it is flushed."""
    if phase == "train" and (not trainer.is_global_zero or not buffer):
        buffer.clear()
        return None
    every_n_steps = trainer.log_every_n_steps
    due = []
    if trainer.is_global_zero:  # (The cadence times the writes it decides; one made everywhere does not reset it.)
        due = due_loggers(cadence, trainer.loggers, phase=phase, step=step, every_n_steps=every_n_steps)
        due = list(trainer.loggers) if everywhere else due
    if phase != "train":
        means = publish(phase, *buffer.scalars(step))  # (means, weights)
        values = buffer.resolve(step, scalars=means) if due else {}
    else:
        wanted = not trainer.loggers and lightning_logs_at(step, every_n_steps)
        values = buffer.resolve(step) if due else {"scalar": buffer.scalars(step)[0]} if wanted else {}
        if due or wanted:
            publish(phase, values.get("scalar", {}), {})
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def write(loggers: list[Any], values: dict[Kind, dict[str, Any]]) -> None:
        logs = Logs(phase, step, max_steps, elapsed_time_s, num_samples, values)
        for logger in loggers:
            write_logs(logger, logs, lightnings_own)

    skipped = [lg for lg in trainer.loggers if lg not in due] if phase == "valid" and trainer.is_global_zero else []
    held = buffer.take() if skipped and not due else None
    buffer.clear()
    if due:
        write(due, values)
    return (lambda: write(skipped, held.resolve(step, scalars=means) if held else values)) if skipped else None
