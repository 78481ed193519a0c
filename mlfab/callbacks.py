"""Callbacks `launch` adds to the Trainer: validation cadence, the final checkpoint, stopping on Ctrl-C."""

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def at_step_boundary(trainer: pl.Trainer, batch_idx: int) -> bool:
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class ValidationCadence(Callback):
    """Validates after the first optimizer step, then every N steps (Lightning's own `val_check_interval`)
    and/or every N seconds of wall-clock time.

    Lightning validates on a step cadence or a time cadence, not both, and not after the first step,
    so this wraps the training loop's validation decision with the extra conditions.
    """

    def __init__(self, every_n_seconds: float | None) -> None:
        self.every_n_seconds = every_n_seconds
        self._last_valid = time.monotonic()
        self._validated_this_run = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        lightning_decision = loop._should_check_val_fx
        self._last_valid = time.monotonic()
        self._validated_this_run = False

        def should_check_val(data_fetcher: Any) -> bool:
            if lightning_decision(data_fetcher):
                return True
            if not at_step_boundary(trainer, loop.batch_idx) or trainer.limit_val_batches == 0:
                return False
            if not self._validated_this_run:
                return True
            return self.every_n_seconds is not None and time.monotonic() - self._last_valid >= self.every_n_seconds

        loop._should_check_val_fx = should_check_val  # type: ignore[method-assign]

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_valid = time.monotonic()
        self._validated_this_run = True


class FinalCheckpoint(Callback):
    """Writes `<exp_dir>/checkpoints/last.ckpt` when training ends, however it ends at a step boundary."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            print(f"Saved checkpoint {self.path}", flush=True)


class GracefulStop(Callback):
    """The first Ctrl-C stops training at the end of the current optimizer step (then the final checkpoint
    is written and the process exits non-zero); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None:
            raise KeyboardInterrupt
        self.signal_received = signum
        print("\nInterrupted: stopping after this step and saving a checkpoint (Ctrl-C again to abort).",
              file=sys.stderr, flush=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.signal_received is not None and at_step_boundary(trainer, batch_idx):
            trainer.should_stop = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
