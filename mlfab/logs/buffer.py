"""Lazy log buffer: `log_*` calls store values or zero-argument callables; nothing runs until a logger writes.

What is written when several values arrive between two writes:
- scalars: the mean of the values logged since the last flush, each weighted by the number of samples of the batch
  it was logged for (`LogBuffer.weight`, set by the task per batch). The training buffer is flushed at every
  optimizer step, so a written training scalar is the value of the step it is written at (averaged over that step's
  accumulated micro-batches); a validation scalar is the sample-weighted mean over the validation run, so a partial
  last batch counts for its size.
- everything else (strings, images, audio, video, histograms, point clouds), in training: the last value logged in
  the step (with accumulation, that of its last micro-batch).
- everything else, in validation, test and predict: the first value logged for each key in the evaluation, i.e.
  that of its first batch. That batch is full (a partial batch can only come last), so a `max_images=16` grid shows 16
  images rather than what is left over at the end of the data, and with a fixed validation set every evaluation
  shows the same samples, which makes evaluations comparable. A string or histogram describes that batch too,
  matching the images beside it; only scalars summarize the whole evaluation. Later values of the key are not
  kept, so their lazy callables never run and their tensors are not held.
Values of steps that no logger writes are dropped without being computed.

A value that cannot be written (a lazy value that raises, a scalar that is not a number) does not stop training: it
is skipped, and the error is logged with the `log_*` call, the key and the step (in full the first time for each
key, then counted every 100th time). A scalar given as a string is refused at the `log_scalar` call itself.
"""

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mlfab.errors import TaskDefinitionError
from mlfab.logs.values import Kind, resolve
from mlfab.state import LogPhase

log = logging.getLogger(__name__)

# The phase of what is logged during predict (Lightning's `trainer.predict`, mlfab's `predict` subcommand), written
# once at its end like an evaluation's, under its own name.
PREDICT: LogPhase = "predict"


def _to_float(value: Any) -> float:
    value = resolve(value)
    count = value.numel() if isinstance(value, torch.Tensor) else np.size(value) if isinstance(value, np.ndarray) else 1
    if count != 1:
        raise ValueError(
            f"a scalar is one number, got a {type(value).__name__} of shape {tuple(value.shape)}: reduce it first "
            "(e.g. .mean()), or log it with log_histogram"
        )
    return float(value.item() if isinstance(value, torch.Tensor | np.ndarray | np.generic) else value)


class LogBuffer:
    """Per-phase pending values. `add` is the hot path: it only stores a reference (and, for a scalar, its weight).

    `phase`: the phase whose values it holds. For "valid", "test" and "predict" it keeps the first value of each
    non-scalar key until it is cleared (the first batch of the evaluation); otherwise (training, or no phase given)
    the last.
    """

    def __init__(self, phase: LogPhase | None = None) -> None:
        self._pending: dict[Kind, dict[str, Any]] = {}  # Scalars: {tag: [(value, weight), ...]}; others: {tag: value}.
        self.keep_first = phase in ("valid", "test", PREDICT)
        self.weight = 1  # The weight of the scalars added now: the number of samples in the current batch.
        self.largest = 1  # The largest batch's weight since the buffer was last cleared: one full batch.
        self.failures: dict[tuple[Kind, str], int] = {}  # Values skipped because they could not be written.

    def add(self, kind: Kind, tag: str, value: Any) -> None:
        by_tag = self._pending.setdefault(kind, {})
        if kind == "scalar":
            if isinstance(value, str | bytes):
                raise TaskDefinitionError(
                    f"log_scalar({tag.partition('/')[2]!r}) got the string {value!r}: a scalar is a number or a "
                    "one-element tensor (or a callable returning one). Use log_string for text."
                )
            by_tag.setdefault(tag, []).append((value, self.weight))
        elif not (self.keep_first and tag in by_tag):
            by_tag[tag] = value

    def weigh(self, samples: int) -> None:
        """The scalars added from now on are for a batch of `samples` samples (at least 1)."""
        self.weight = max(1, samples)
        if self.weight > self.largest:
            self.largest = self.weight

    def __bool__(self) -> bool:
        return bool(self._pending)

    def clear(self) -> None:
        self._pending = {}
        self.weight = self.largest = 1

    def take(self) -> "LogBuffer":
        """A buffer holding what this one held (its failures counted together); this one is left empty."""
        held = LogBuffer()
        held._pending, held.failures = self._pending, self.failures
        self.clear()
        return held

    def scalars(self, step: int) -> tuple[dict[str, float], dict[str, int | float]]:
        """Each pending scalar's weighted mean and the sum of its weights; runs each callable once. A scalar that
        fails is skipped and reported."""
        means: dict[str, float] = {}
        weights: dict[str, int | float] = {}
        for tag, pairs in self._pending.get("scalar", {}).items():
            try:
                values = [_to_float(v) for v, _ in pairs]
            except Exception as e:
                self._skipped("scalar", tag, step, e)
                continue
            total = sum(w for _, w in pairs)
            if all(w == pairs[0][1] for _, w in pairs):  # Equal weights: the plain mean, bit for bit.
                means[tag] = sum(values) / len(values)
            else:
                means[tag] = sum(v * w for v, (_, w) in zip(values, pairs, strict=True)) / total
            weights[tag] = total
        return means, weights

    def settle(self, step: int, tags: Iterable[str] | None = None) -> tuple[dict[str, float], dict[str, int | float]]:
        """`scalars` of `tags` alone (those pending; None: every one), each then held as its resolved mean: a callable
        runs once, also when the buffer is written later."""
        by_tag = self._pending.get("scalar", {})
        tags = list(by_tag) if tags is None else tags
        some = LogBuffer()
        some._pending = {"scalar": {tag: by_tag.pop(tag) for tag in tags if tag in by_tag}}
        some.failures = self.failures
        means, weights = some.scalars(step)
        by_tag.update({tag: [(means[tag], weights[tag])] for tag in means})
        return means, weights

    def resolve(self, step: int, scalars: dict[str, float] | None = None) -> dict[Kind, dict[str, Any]]:
        """Runs each pending callable exactly once and returns plain values; one that fails is skipped and reported.
        `scalars`: the scalars, already resolved (by `scalars`, then perhaps averaged over ranks)."""
        out: dict[Kind, dict[str, Any]] = {}
        for kind, by_tag in self._pending.items():
            if kind == "scalar":
                out[kind] = self.scalars(step)[0] if scalars is None else scalars
                continue
            out[kind] = {}
            for tag, value in by_tag.items():
                try:
                    out[kind][tag] = resolve(value)
                except Exception as e:
                    self._skipped(kind, tag, step, e)
        return out

    def _skipped(self, kind: Kind, tag: str, step: int, error: Exception) -> None:
        count = self.failures[kind, tag] = self.failures.get((kind, tag), 0) + 1
        call = f"log_{kind}({tag.partition('/')[2]!r}, namespace={tag.partition('/')[0]!r})"
        if count == 1:
            log.error("%s could not be written at step %d and is skipped (training goes on; later failures of this "
                      "key are counted): %r", call, step, error, exc_info=error)  # fmt: skip
        elif count % 100 == 0:
            log.error("%s could not be written at step %d: %d failures so far (%r)", call, step, count, error)


def lightning_logs_at(step: int, every_n_steps: int) -> bool:
    """Whether Lightning writes its own `self.log` values at `step` (its `log_every_n_steps` rule, the step counted
    from 0): mlfab's values go to a Lightning logger at the same steps (in rows of their own: one `log_metrics`
    call each)."""
    return (step + 1) % max(every_n_steps, 1) == 0


class Cadence:
    """Decides, per logger and phase, whether this flush is written (the first of each phase always is)."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, LogPhase], float] = {}

    def due(self, logger: Any, phase: LogPhase, step: int, every_n_steps: int, now: float) -> bool:
        key = (id(logger), phase)
        last = self._last.get(key)
        interval = getattr(logger, "log_interval_seconds", None)
        if last is None:
            due = True
        elif interval is not None:
            seconds = interval.get(phase, 0.0) if isinstance(interval, dict) else float(interval)
            due = now - last >= seconds
        else:  # A plain Lightning logger: the Trainer's `log_every_n_steps` for training, every validation run.
            due = phase != "train" or lightning_logs_at(step, every_n_steps)
        if due:
            self._last[key] = now
        return due


def due_loggers(cadence: Cadence, loggers: list[Any], *, phase: LogPhase, step: int, every_n_steps: int) -> list[Any]:
    now = time.monotonic()
    return [lg for lg in loggers if cadence.due(lg, phase, step, every_n_steps, now)]
