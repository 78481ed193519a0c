"""Lazy log buffer: `log_*` calls store values or zero-argument callables; nothing runs until a logger writes.

What is written when several values arrive between two writes:
- scalars: the mean of the values logged since the last flush. The training buffer is flushed at every
  optimizer step, so a written training scalar is the value of the step it is written at (averaged over
  that step's accumulated micro-batches); a validation scalar is the mean over the validation run's batches.
- everything else (strings, images, audio, ...): the last value logged.
Values of steps that no logger writes are dropped without being computed.
"""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlfab.state import Phase

Kind = str  # One of KINDS.
KINDS = ("scalar", "string", "image", "audio", "video", "histogram", "point_cloud")


@dataclass
class Audio:
    """float32 samples in [-1, 1], shape (T,) for mono or (T, C)."""

    samples: np.ndarray
    sample_rate: int


@dataclass
class Video:
    """uint8 frames, shape (T, H, W, 3)."""

    frames: np.ndarray
    fps: int

    @functools.cached_property
    def gif(self) -> bytes:
        """The frames as an animated GIF, encoded once however many loggers write it."""
        from mlfab.media import gif_bytes

        return gif_bytes(self.frames, self.fps)


@dataclass
class PointCloud:
    """float32 points (N, 3) and optional uint8 colors (N, 3)."""

    points: np.ndarray
    colors: np.ndarray | None = None


def finite(values: np.ndarray) -> np.ndarray:
    """A histogram's values without NaN and inf, which histogram writers cannot bin (possibly empty)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


# Resolved value of each kind, as loggers receive it:
#   scalar: float          string: str                image: uint8 HWC RGB np.ndarray
#   audio: Audio           video: Video               histogram: float np.ndarray (the raw values, flattened)
#   point_cloud: PointCloud


@dataclass
class Logs:
    """Resolved values for one write, grouped by kind; tags are `<namespace>/<key>`."""

    phase: Phase
    step: int
    max_steps: int | None
    elapsed_time_s: float
    num_samples: int
    values: dict[Kind, dict[str, Any]] = field(default_factory=dict)

    def of(self, kind: Kind) -> dict[str, Any]:
        return self.values.get(kind, {})

    @property
    def scalars(self) -> dict[str, float]:
        return self.of("scalar")


def resolve(value: Any) -> Any:
    return value() if callable(value) else value


def _to_float(value: Any) -> float:
    value = resolve(value)
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item()) if value.numel() != 1 else float(value.item())
    return float(value)


class LogBuffer:
    """Per-phase pending values. `add` is the hot path: it only stores a reference."""

    def __init__(self) -> None:
        self._pending: dict[Kind, dict[str, list[Any]]] = {}

    def add(self, kind: Kind, tag: str, value: Any) -> None:
        by_tag = self._pending.setdefault(kind, {})
        if kind == "scalar":
            by_tag.setdefault(tag, []).append(value)
        else:
            by_tag[tag] = [value]

    def __bool__(self) -> bool:
        return bool(self._pending)

    def clear(self) -> None:
        self._pending = {}

    def resolve(self) -> dict[Kind, dict[str, Any]]:
        """Runs each pending callable exactly once and returns plain values."""
        out: dict[Kind, dict[str, Any]] = {}
        for kind, by_tag in self._pending.items():
            if kind == "scalar":
                out[kind] = {tag: sum(_to_float(v) for v in vals) / len(vals) for tag, vals in by_tag.items()}
            else:
                out[kind] = {tag: resolve(vals[-1]) for tag, vals in by_tag.items()}
        return out


class Cadence:
    """Decides, per logger and phase, whether this flush is written (the first of each phase always is)."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, Phase], float] = {}

    def due(self, logger: Any, phase: Phase, step: int, every_n_steps: int, now: float) -> bool:
        key = (id(logger), phase)
        last = self._last.get(key)
        interval = getattr(logger, "log_interval_seconds", None)
        if last is None:
            due = True
        elif interval is not None:
            seconds = interval.get(phase, 0.0) if isinstance(interval, dict) else float(interval)
            due = now - last >= seconds
        else:  # A plain Lightning logger: the Trainer's `log_every_n_steps` for training, every validation run.
            due = phase != "train" or step % max(every_n_steps, 1) == 0
        if due:
            self._last[key] = now
        return due


def due_loggers(cadence: Cadence, loggers: list[Any], *, phase: Phase, step: int, every_n_steps: int) -> list[Any]:
    now = time.monotonic()
    return [lg for lg in loggers if cadence.due(lg, phase, step, every_n_steps, now)]


def mean_across_ranks(scalars: dict[str, float], reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Every rank's scalars averaged, in one collective (all ranks log the same keys)."""
    keys = sorted(scalars)
    if not keys:
        return scalars
    mean = reduce(torch.tensor([scalars[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, mean.tolist(), strict=True))


def flush_logs(
    trainer: Any,
    buffer: LogBuffer,
    cadence: Cadence,
    *,
    phase: Phase,
    step: int,
    elapsed_time_s: float,
    num_samples: int,
) -> None:
    """Writes the buffer to the loggers that are due (rank zero only), then clears it.

    In multi-process training, validation scalars are averaged over ranks first: rank zero decides
    whether anything is written and only then do the ranks compute and reduce their values."""
    from mlfab.loggers.dispatch import write_logs

    averaged = trainer.world_size > 1 and phase != "train"
    # Every rank must reach the collectives below, even with an empty buffer, or the others wait forever.
    if not (trainer.is_global_zero or averaged) or (not buffer and not averaged):
        buffer.clear()
        return
    due = (
        due_loggers(cadence, trainer.loggers, phase=phase, step=step, every_n_steps=trainer.log_every_n_steps)
        if trainer.is_global_zero
        else []
    )
    values: dict[Kind, dict[str, Any]] = {}
    if averaged and trainer.strategy.broadcast(bool(due), src=0):
        values = buffer.resolve()
        device = trainer.strategy.root_device
        values["scalar"] = mean_across_ranks(
            values.get("scalar", {}), lambda t: trainer.strategy.reduce(t.to(device), reduce_op="mean").cpu()
        )
    elif due:
        values = buffer.resolve()
    buffer.clear()
    if due:
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        logs = Logs(phase, step, max_steps, elapsed_time_s, num_samples, values)
        for logger in due:
            write_logs(logger, logs)
