"""Training diagnostics mlfab logs by itself, as mlfab 0.2 did: the `Diagnostics` callback `launch` adds.

Config key `diagnostics` (a list; all by default, `[]` for none) picks the groups:

| group        | logged as (training values)                                               | when              |
|--------------|---------------------------------------------------------------------------|-------------------|
| `grad_norm`  | `optim/grad_norm`: total 2-norm of the gradients, before clipping         | it is computed    |
| `speed`      | `speed/steps_per_second`, `speed/samples_per_second`, `speed/data_wait_s` | always            |
| `time`       | `time/remaining_s`: estimated seconds to `max_steps`                      | max_steps is set  |
| `memory`     | `memory/cpu_peak_rss_mb`, `memory/gpu_peak_mb` (MiB)                      | GPU: on CUDA      |
| `loss_scale` | `optim/loss_scale`: the fp16 gradient scaler's current scale              | 16-mixed          |

(The learning rate is the task's own `optim/lr`, logged whatever this says.)

What they mean:
- `optim/grad_norm` reuses the norm mlfab computes anyway for clipping and its non-finite check
  (mlfab/nonfinite.py): the one `clip_grad_norm` computes when clipping is on, else each gradient's norm from the
  non-finite check, combined into the total (a small reduction) only at the steps a logger writes. Under
  16-mixed without clipping neither runs (loss scaling checks the gradients itself), so there is none. On a
  step skipped for a non-finite gradient it is inf or nan.
- `speed/*` are means over the steps since the previous written step (the previous time a logger wrote this
  run's training values), on the training clock: time spent validating is left out; writing checkpoints and logs
  is in. `samples_per_second` counts what mlfab's `num_samples` counts (each batch's `get_num_samples`; for a module
  that is not an mlfab Task, `batch_size` samples per batch and rank).
  `data_wait_s` is the time per optimizer step between the end of one batch (Lightning's `on_train_batch_end`)
  and the start of the next (`on_train_batch_start`): waiting for the data loader (with workers: for a batch
  they had not finished) and moving the batch to the device, plus mlfab's own log writing on the steps it writes.
  The wait after a checkpoint was saved is not counted (the save would be).
- `time/remaining_s`: the steps left to `max_steps` times the mean time per step of this session (since the end
  of its first step, which includes start-up), validations and checkpoints included: an ETA. 0 at the last step.
- `memory/cpu_peak_rss_mb`: the peak resident memory of the training process (rank zero's, which writes the
  logs; dataloader workers are other processes), `resource.getrusage`; not on Windows.
  `memory/gpu_peak_mb`: `torch.cuda.max_memory_allocated` of the training device, tensors only (the caching
  allocator reserves more).

Cost: each step, two `time.perf_counter()` calls, a few attribute writes and one `log_scalar` per value with a
zero-argument callable, which runs only at the steps a logger writes (mlfab/logs/buffer.py);
`benchmarks/diagnostics_overhead.py` measures it. Only the per-step hooks it uses are called (StepFreeCallback).

The values are read when the step's logs are written, which the task does in its own `on_train_batch_end`, right
after Lightning called this callback's for the same batch.
"""

import functools
import sys
import time
import typing
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from mlfab._lightning import StepFreeCallback, step_ends
from mlfab.compiling import COMPILE_S
from mlfab.config import Diagnostic
from mlfab.nonfinite import NonFiniteGuard, total_norm

try:
    import resource
except ImportError:  # Windows: no getrusage.
    resource = None  # type: ignore[assignment]

GROUPS: tuple[str, ...] = typing.get_args(Diagnostic)

# The tags (`<namespace>/<key>`) of the `speed`, `time` and `memory` groups: what `Diagnostics` logs them as.
STEPS_PER_SECOND = "speed/steps_per_second"
SAMPLES_PER_SECOND = "speed/samples_per_second"
DATA_WAIT_S = "speed/data_wait_s"
REMAINING_S = "time/remaining_s"
CPU_PEAK_RSS_MB = "memory/cpu_peak_rss_mb"
GPU_PEAK_MB = "memory/gpu_peak_mb"
# What the terminal line (mlfab.StdoutLogger, which shows its own steps/s and ETA) leaves out: exactly these tags, so
# that a task's own values in the `speed`, `time` or `memory` namespaces are shown; and the compile time, printed once.
TERMINAL_HIDDEN_TAGS: frozenset[str] = frozenset(
    {STEPS_PER_SECOND, SAMPLES_PER_SECOND, DATA_WAIT_S, REMAINING_S, CPU_PEAK_RSS_MB, GPU_PEAK_MB, COMPILE_S}
)


def _entry(tag: str, value: Callable[[], float]) -> tuple[str, Callable[[], float], str]:
    """(key, lazy value, namespace) of a tag, as `Diagnostics` hands it to `log_scalar`."""
    namespace, _, key = tag.partition("/")
    return key, value, namespace


def cpu_peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (`ru_maxrss` is in KiB on Linux, in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Diagnostics(StepFreeCallback):
    """Logs the diagnostics of the groups given (see the module's docstring) through an mlfab task's lazy
    `log_scalar`; with any other LightningModule it does nothing."""

    def __init__(self, groups: Iterable[str] = GROUPS) -> None:
        self.groups = frozenset(groups)
        if unknown := self.groups.difference(GROUPS):
            raise ValueError(f"Unknown diagnostics {sorted(unknown)}; the groups are {', '.join(GROUPS)}")
        if "speed" not in self.groups:  # Only the data wait needs the batch start: Lightning skips a None hook.
            self.on_train_batch_start = None  # type: ignore[assignment,method-assign]
        self._trainer: pl.Trainer | None = None  # Set while training.
        self._values: list[tuple[str, Callable[[], float], str]] = []  # (key, lazy value, namespace) per step.
        self._guard: NonFiniteGuard | None = None
        self._batch_is_step = True  # No gradient accumulation: no need to ask Lightning whether a step ends.
        self._task: Any = None  # While training an mlfab task: whose `num_samples` `samples_per_second` counts.
        self._per_batch = 0  # Otherwise `batch_size` samples per batch and rank.
        self._validation_start_t = 0.0
        self._restart(0.0)

    def _restart(self, now: float) -> None:
        """Clocks and counters for a training session starting at `now` (perf_counter seconds)."""
        self._start_t = self._step_end_t = self._first_step_end_t = now
        self._batch_end_t: float | None = now  # The first batch's wait includes starting the loader.
        self._wait_s = self._paused_s = 0.0
        self._batches = self._steps = 0
        self._window = (now, 0, 0, 0.0)  # (training clock, steps, samples, wait) at the last written step.
        self._speed_at = -1  # The step `_speed` was computed at.
        self._speed_values = (0.0, 0.0, 0.0)

    # ----------------------------------------------------------------------------------------------------------------
    # Per step: timestamps and counters, and the lazy values handed to the task.

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_end_t is not None:
            self._wait_s += time.perf_counter() - self._batch_end_t

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_end_t = now = time.perf_counter()
        self._batches += 1
        if self._trainer is None or not (self._batch_is_step or step_ends(trainer)):
            return
        self._steps += 1
        self._step_end_t = now
        if self._steps == 1:
            self._first_step_end_t = now
        log = pl_module.log_scalar
        if self._guard is not None and (norm := self._guard.take_grad_norm()) is not None:
            log("grad_norm", functools.partial(total_norm, norm), namespace="optim")
        for key, value, namespace in self._values:
            log(key, value, namespace=namespace)

    # ----------------------------------------------------------------------------------------------------------------
    # Once per run, validation or checkpoint.

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart(time.perf_counter())
        self._batch_is_step = trainer.accumulate_grad_batches == 1
        config, state = getattr(pl_module, "config", None), getattr(pl_module, "state", None)
        per_batch = (getattr(config, "batch_size", None) or 0) * trainer.world_size
        self._task, self._per_batch = (pl_module if callable(state) else None), per_batch
        self._window = (self._start_t, 0, self._samples_now(), 0.0)  # A resumed run's count starts where it was.
        if not callable(getattr(pl_module, "log_scalar", None)):  # Not an mlfab task: nothing to log through.
            return
        self._trainer = trainer
        guard = getattr(pl_module, "nonfinite_guard", None)
        self._guard = guard if "grad_norm" in self.groups and isinstance(guard, NonFiniteGuard) else None
        if self._guard is not None:
            self._guard.grad_norm = None  # Nothing from before this run.
        self._values = []
        if "speed" in self.groups:
            self._values.append(_entry(STEPS_PER_SECOND, lambda: self._speed()[0]))
            if callable(state) or per_batch:
                self._values.append(_entry(SAMPLES_PER_SECOND, lambda: self._speed()[1]))
            self._values.append(_entry(DATA_WAIT_S, lambda: self._speed()[2]))
        if "time" in self.groups and trainer.max_steps > 0:
            self._values.append(_entry(REMAINING_S, self._remaining_s))
        if "memory" in self.groups:
            if resource is not None:
                self._values.append(_entry(CPU_PEAK_RSS_MB, cpu_peak_rss_mb))
            if (device := pl_module.device).type == "cuda":
                self._values.append(_entry(GPU_PEAK_MB, lambda: torch.cuda.max_memory_allocated(device) / 2**20))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if "loss_scale" in self.groups and callable(getattr(scaler, "get_scale", None)):
            self._values.append(("loss_scale", scaler.get_scale, "optim"))  # type: ignore[union-attr]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._values, self._guard, self._task = None, [], None, None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start_t = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trainer is None:  # Not within training (`validate`, or the sanity check before it starts).
            return
        paused = time.perf_counter() - self._validation_start_t
        self._paused_s += paused  # Off the training clock, ...
        if self._batch_end_t is not None:
            self._batch_end_t += paused  # ... and not waiting for data.

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._batch_end_t = None  # The file is written after this: the next batch's wait would include it.

    # ----------------------------------------------------------------------------------------------------------------
    # The lazy values: run only at the steps a logger writes, in the task's flush of the step that logged them.

    def _speed(self) -> tuple[float, float, float]:
        """(steps/s, samples/s, data wait per step) over the steps since the previous written step; computed once
        per step (for whichever of its keys is resolved first), which then starts the next window."""
        if self._speed_at != self._steps:
            clock = self._step_end_t - self._paused_s
            start, steps, samples, wait = self._window
            seconds = max(clock - start, 1e-9)
            n = max(self._steps - steps, 1)
            samples_now = self._samples_now()
            self._speed_values = (
                (self._steps - steps) / seconds,
                (samples_now - samples) / seconds,
                (self._wait_s - wait) / n,
            )
            self._window = (clock, self._steps, samples_now, self._wait_s)
            self._speed_at = self._steps
        return self._speed_values

    def _samples_now(self) -> int:
        """The run's sample count so far (a method, not a lambda: ddp_spawn pickles callbacks)."""
        return self._task.state("train").num_samples if self._task is not None else self._batches * self._per_batch

    def _remaining_s(self) -> float:
        trainer = self._trainer
        if trainer is None:
            return float("nan")
        if self._steps > 1:  # The session's first step includes starting up.
            per_step = (self._step_end_t - self._first_step_end_t) / (self._steps - 1)
        else:
            per_step = self._step_end_t - self._start_t
        return max(trainer.max_steps - trainer.global_step, 0) * per_step
