"""Writes resolved `Logs` to any Lightning logger: mlfab loggers natively, others through their own API.

Lightning's loggers have no common media call, so each known backend gets its native one. Plain loggers
(CSV and others) get scalars through `log_metrics`; a kind a logger cannot show is skipped with one
warning per logger type and kind. Single-stream loggers get the phase as a tag prefix (`valid/loss/loss`).
"""

import warnings
from typing import Any

from mlfab.logbuffer import Logs
from mlfab.loggers.base import MlfabLogger

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


def _write_tensorboard(writer: Any, logs: Logs, prefix: str) -> set[str]:
    for tag, value in logs.scalars.items():
        writer.add_scalar(prefix + tag, value, logs.step)
    for tag, text in logs.of("string").items():
        writer.add_text(prefix + tag, text, logs.step)
    for tag, image in logs.of("image").items():
        writer.add_image(prefix + tag, image, logs.step, dataformats="HWC")
    return {"scalar", "string", "image"}


def write_logs(logger: Any, logs: Logs) -> None:
    if isinstance(logger, MlfabLogger):
        logger.write(logs)
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    prefix = f"{logs.phase}/"
    if isinstance(logger, TensorBoardLogger):
        handled = _write_tensorboard(logger.experiment, logs, prefix)
    else:
        if logs.scalars:
            logger.log_metrics({prefix + k: v for k, v in logs.scalars.items()}, step=logs.step)
        handled = {"scalar"}
    for kind, values in logs.values.items():
        if values and kind not in handled:
            _warn_once(logger, kind)
