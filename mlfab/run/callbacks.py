"""Callbacks `launch` adds to the Trainer: validation cadence, the final checkpoint, stopping on Ctrl-C."""

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from mlfab._lightning import CachedStateKey, StepFreeCallback, step_ends, wrap_validation_decision
from mlfab.run.slurm import after_signal_checkpoint


class PeriodicCheckpoint(StepFreeCallback, CachedStateKey, ModelCheckpoint):
    """Lightning's ModelCheckpoint at a lower price per step: besides the unused hooks, its `state_key` (which
    Lightning formats for every hook it dispatches, from a repr of the callback's settings) is made once."""


class ValidationCadence(StepFreeCallback):
    """Validates after the first optimizer step of a new run (or once `first_n_seconds` have passed), then
    every N steps (Lightning's own `val_check_interval`) and/or every N seconds of wall-clock time.

    Lightning validates on a step cadence or a time cadence, not both, and not after the first step,
    so this wraps the training loop's validation decision with the extra conditions. A resumed run does
    not add a validation of its own, so it validates at the same steps as an uninterrupted one.
    """

    def __init__(self, every_n_seconds: float | None, first_n_seconds: float | None = None) -> None:
        self.every_n_seconds = every_n_seconds
        self.first_n_seconds = first_n_seconds
        self._start = self._last_valid = time.monotonic()
        self._validated = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_valid = time.monotonic()
        self._validated = trainer.global_step > 0  # Resumed: the first validation already happened.

        def should_check_val(lightning_decision: Callable[[Any], bool], data_fetcher: Any) -> bool:
            if trainer.should_stop:  # Stopping (a signal, or max_steps): no extra validation on the way out.
                return False
            if lightning_decision(data_fetcher):
                return True
            if not step_ends(trainer) or trainer.limit_val_batches == 0:
                return False
            now = time.monotonic()
            if not self._validated:
                return self.first_n_seconds is None or now - self._start >= self.first_n_seconds
            return self.every_n_seconds is not None and now - self._last_valid >= self.every_n_seconds

        wrap_validation_decision(trainer, should_check_val)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_valid = time.monotonic()
        self._validated = True


class FinalCheckpoint(StepFreeCallback):
    """Writes `<exp_dir>/checkpoints/last.ckpt` when training ends, however it ends at a step boundary."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            print(f"Saved checkpoint {self.path}", flush=True)


class GracefulStop(StepFreeCallback):
    """Signals act at the end of the current optimizer step, never inside the handler:

    - SIGINT (Ctrl-C) and SIGTERM stop training; the final checkpoint is written and the process exits
      with 128 + the signal number. A second SIGINT aborts at once.
    - SIGUSR1 writes a checkpoint; inside a Slurm job it then requeues the job and stops (the requeued job
      resumes from that checkpoint), otherwise training goes on.
    """

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._save_requested = False
        self._distributed = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self._save_requested = True
            return
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_received = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this step and saving a checkpoint"
            + (" (Ctrl-C again to abort)." if signum == signal.SIGINT else "."),
            file=sys.stderr,
            flush=True,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._distributed = trainer.world_size > 1
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                self._previous[signum] = signal.signal(signum, self._handler)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop, save = self.signal_received is not None, self._save_requested
        if not (stop or save or self._distributed) or not step_ends(trainer):
            return  # The common case costs two attribute reads.
        if trainer.world_size > 1:  # Every rank must act at the same step: one all-reduce for both flags.
            flags = torch.tensor([float(stop), float(save)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            stop, save = bool(flags[0]), bool(flags[1])
        if stop:
            trainer.should_stop = True
        elif save:
            self._save_requested = False
            path = Path(trainer.default_root_dir) / "checkpoints" / f"signal_step_{trainer.global_step:08d}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                print(f"SIGUSR1: saved checkpoint {path}", file=sys.stderr, flush=True)
            requeued = after_signal_checkpoint(trainer.global_rank)  # In a Slurm job: requeue, then stop.
            if trainer.world_size > 1:  # Only rank zero knows whether `scontrol requeue` worked.
                requeued = trainer.strategy.broadcast(requeued, src=0)
            if requeued:
                trainer.should_stop = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
