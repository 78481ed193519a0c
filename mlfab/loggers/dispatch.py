"""Writes resolved `Logs` to any Lightning logger: mlfab loggers natively, others through their own API.

Lightning's loggers have no common media call, so each known backend gets its native one. Plain loggers
(CSV and others) get scalars through `log_metrics`; a kind a logger cannot show is skipped with one
warning per logger type and kind. Single-stream loggers get the phase as a tag prefix (`valid/loss/loss`).
"""

import warnings
from pathlib import Path
from typing import Any

from mlfab.logbuffer import KINDS, Logs
from mlfab.loggers.base import MlfabLogger
from mlfab.loggers.tensorboard import write_summaries

_warned: set[tuple[str, str]] = set()


def _warn_once(logger: Any, kind: str) -> None:
    key = (type(logger).__name__, kind)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{type(logger).__name__} cannot show logged {kind} values; they are skipped for this logger. "
            "Add mlfab.TensorboardLogger or another logger that supports them.",
            stacklevel=2,
        )


def write_logs(logger: Any, logs: Logs) -> None:
    if isinstance(logger, MlfabLogger):
        logger.write(logs)
        return
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    prefix = f"{logs.phase}/"
    if isinstance(logger, TensorBoardLogger):
        handled = write_summaries(logger.experiment, logs, prefix)
    elif isinstance(logger, WandbLogger):
        from mlfab.loggers.wandb import write_wandb

        write_wandb(logger.experiment, logs, prefix)
        handled = KINDS
    else:
        if logs.scalars:
            logger.log_metrics({prefix + k: v for k, v in logs.scalars.items()}, step=logs.step)
        handled = ("scalar",)
    for kind, values in logs.values.items():
        if values and kind not in handled:
            _warn_once(logger, kind)


def run_info(config_yaml: str, provenance: str, exp_dir: Path) -> dict[str, str]:
    """The texts every logger gets once per run; the git diff and source come from the provenance folder."""
    info = {"config": config_yaml, "provenance": provenance}
    prov = exp_dir / "provenance"
    gits = sorted(prov.glob("git*.txt"), key=lambda p: p.stat().st_mtime_ns)
    if gits:
        info["git_diff"] = gits[-1].read_text()
    sources = sorted((p for p in prov.glob("source*/*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    if sources:
        info["source"] = sources[-1].read_text()
    return info


def write_run_info(loggers: list[Any], config_yaml: str, provenance: str, exp_dir: Path) -> None:
    """Once per run: the config and where the run came from, as text wherever a logger can show text."""
    from lightning.pytorch.loggers import TensorBoardLogger

    info = run_info(config_yaml, provenance, exp_dir)
    for logger in loggers:
        if isinstance(logger, MlfabLogger):
            logger.write_run_info(info)
        elif isinstance(logger, TensorBoardLogger):
            for name, text in info.items():
                logger.experiment.add_text(f"run/{name}", f"```\n{text}\n```", 0)
