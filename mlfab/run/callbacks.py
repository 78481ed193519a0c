"""Callbacks `launch` adds to the Trainer: validation cadence, the final checkpoint, stopping on Ctrl-C, and the
`predict` subcommand's output file."""

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import BasePredictionWriter, GradientAccumulationScheduler, ModelCheckpoint
from typing_extensions import override

from mlfab._lightning import (
    CachedStateKey,
    StepFreeCallback,
    lightning_data_fetcher,
    step_ends,
    validate_before_next_batch,
    wrap_validation_decision,
)
from mlfab.loggers.stdout import StdoutLogger
from mlfab.optim import set_optimizer_mode
from mlfab.run.slurm import after_signal_checkpoint, in_slurm_job


class PeriodicCheckpoint(StepFreeCallback, CachedStateKey, ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving only where an optimizer step ends (under gradient accumulation its step
    trigger also fires on the step's other batches, after a resume too), with its time cadence counted in training
    time across relaunches, at a lower price per step (see mlfab/_lightning.py)."""

    _carried_s = 0.0  # Seconds since the last timed check when the checkpoint we resumed from was written.

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if step_ends(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time_checked = time.monotonic() - self._carried_s

    @override
    def state_dict(self) -> dict[str, Any]:
        since = 0.0 if self._last_time_checked is None else time.monotonic() - self._last_time_checked
        return {**super().state_dict(), "seconds_since_time_check": since}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._carried_s = float(state_dict.get("seconds_since_time_check", 0.0))
        # Which files to keep is decided over the directory by AtomicCheckpointIO (keep_last); Lightning's own list
        # from the last session would crash it when keep_last_n_checkpoints is lowered (KeyError: '').
        self.best_k_models, self.kth_best_model_path = {}, ""


class ValidationCadence(StepFreeCallback):
    """Validates after the first optimizer step of a new run, then every `every_n_steps` optimizer steps and/or every
    `every_n_seconds` seconds of training time, and after the last step. With `first_n_seconds`, nothing but the
    final validation comes before that much training time; the first comes at the first step end after it.

    Lightning validates on a step cadence or a time cadence, not both, and not after the first step, so this wraps
    the training loop's validation decision. Lightning counts batches, and its count drifts from the optimizer steps
    where an epoch ends part-way through a gradient accumulation (Lightning steps the optimizer at an epoch's last
    batch): mlfab decides at step ends by `global_step`. A Trainer whose `val_check_interval` is not the one mlfab
    derived (`lightning_interval`: `--trainer.val_check_interval` given) validates where Lightning decides instead
    of every `every_n_steps` steps. A resumed run does not add a validation of its own, so it validates at the same
    steps as an uninterrupted one; the seconds are the task's training clock (`elapsed_time_s`, which continues
    across relaunches), so a run preempted more often than the interval still validates on time. A checkpoint
    written at a step that was to validate (they are written before the validation) records it, and the resumed run
    does that validation first. So does one written at `max_steps` before the final validation (a signal in the last
    step): the relaunch validates and ends.
    """

    def __init__(
        self,
        every_n_seconds: float | None,
        first_n_seconds: float | None = None,
        every_n_steps: int | None = None,
        lightning_interval: Any = None,
    ) -> None:
        self.every_n_seconds = every_n_seconds
        self.first_n_seconds = first_n_seconds
        self.every_n_steps = every_n_steps
        self.lightning_interval = lightning_interval  # The `val_check_interval` mlfab gave the Trainer (None: none).
        self._by_steps = False  # mlfab's step cadence decides, not Lightning's batch count (set when training starts).
        self._last_valid_s = 0.0  # On the training clock.
        self._validated = False
        self._restored = False  # The checkpoint resumed from had this callback's state.
        self._validated_step = -1
        self._owed = False  # The checkpoint we resumed from was written before a validation that is still due.
        self._trainer: pl.Trainer | None = None  # Set when training starts, with the clock and Lightning's decision.
        self._clock: Callable[[], float] = time.monotonic
        self._lightning_decision: Callable[[Any], bool] | None = None  # Lightning's own, once training starts.
        self._decided = (-1, False)  # (global step, whether a validation follows it)
        self._max_steps: int | None = None  # The Trainer's max_steps, while the fit loop is let start past it.

    @property
    def _timed(self) -> bool:
        return self.every_n_seconds is not None or self.first_n_seconds is not None

    @property
    def owed(self) -> bool:
        """Whether the resumed run validates first: its checkpoint was written before a validation still due."""
        return self._owed

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.monotonic()

        def clock() -> float:  # An mlfab task's training clock; else this session's. Rank zero's on every rank: each
            elapsed = getattr(pl_module, "elapsed_time_s", None)  # deciding by its own went into other collectives.
            now = elapsed if isinstance(elapsed, float) else time.monotonic() - start
            return trainer.strategy.broadcast(now, src=0) if trainer.world_size > 1 else now

        self._trainer, self._clock = trainer, clock
        # Resumed from a checkpoint without this state (written by another Trainer): the first validation happened.
        self._validated = self._validated or (trainer.global_step > 0 and not self._restored)
        self._by_steps = self.lightning_interval is not None and trainer.val_check_interval == self.lightning_interval
        if self._owed and trainer.global_step > 0:
            validate_before_next_batch(trainer)
        self._lightning_decision = wrap_validation_decision(
            trainer, lambda lightning_decision, data_fetcher: self.validates_now(trainer, data_fetcher)
        )
        self._decided = (-1, False)

    def validates_now(self, trainer: pl.Trainer, data_fetcher: Any = None) -> bool:
        """Whether a validation follows the batch that just ended (asked by the training loop after every batch, and
        by the task at a step's end, to write that step's logs everywhere): decided once per step."""
        if self._decided[0] == trainer.global_step and step_ends(trainer):
            return self._decided[1]
        if self._owed:
            decision = True
        elif trainer.should_stop:  # Stopping: the final model is validated, unless a signal stops it (`_final`).
            decision = self._final(trainer)
        else:
            decision = self._due(data_fetcher or lightning_data_fetcher(trainer)) or self._final(trainer)
        if step_ends(trainer):
            self._decided = (trainer.global_step, decision)
        return decision

    def due_now(self, trainer: pl.Trainer) -> bool:
        """Whether the step that just ended was to validate by the cadence, whether or not training ends there."""
        return self._due(lightning_data_fetcher(trainer))

    def _due(self, data_fetcher: Any) -> bool:
        """Whether the step that just ended was to validate (asked after its last batch), whether or not training is
        stopping. Nothing is due before `first_n_seconds` of training time (the final validation, `_final`, is)."""
        trainer = self._trainer
        if trainer is None or self._lightning_decision is None or self._validated_step == trainer.global_step:
            return False
        if not self._by_steps and self._lightning_says(trainer, data_fetcher):
            return self.first_n_seconds is None or self._clock() >= self.first_n_seconds
        if not step_ends(trainer) or trainer.limit_val_batches == 0:
            return False
        now = self._clock() if self._timed else 0.0  # (A collective under DDP: only where a cadence needs it.)
        if self.first_n_seconds is not None and now < self.first_n_seconds:
            return False
        if not self._validated:
            return True
        if self._by_steps and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            return True
        return self.every_n_seconds is not None and now - self._last_valid_s >= self.every_n_seconds

    def _final_due(self, trainer: pl.Trainer) -> bool:
        """Whether the step that just ended is `max_steps`' and its final validation is still to come (a checkpoint
        written now, before it, records it as owed)."""
        if not step_ends(trainer) or trainer.limit_val_batches == 0 or self._validated_step == trainer.global_step:
            return False
        return 0 < trainer.max_steps <= trainer.global_step

    def _lightning_says(self, trainer: pl.Trainer, data_fetcher: Any) -> bool:
        """Lightning's own decision (the user's `val_check_interval`), asked as if training were not stopping (it says
        yes to any stop request)."""
        assert self._lightning_decision is not None
        stopping, trainer.should_stop = trainer.should_stop, False
        try:
            return self._lightning_decision(data_fetcher)
        finally:
            trainer.should_stop = stopping

    def _final(self, trainer: pl.Trainer) -> bool:
        """Whether the step that just ended is the last one (max_steps, or a stop asked for by max_time or a
        callback) and was not validated yet: training always ends with a validation of the final model. Not when a
        signal stops it (GracefulStop): the checkpoint comes first, within the grace period a cluster gives, and
        records the validation as owed: the relaunch runs it first (at `max_steps`, it then ends)."""
        if not step_ends(trainer) or trainer.limit_val_batches == 0 or self._validated_step == trainer.global_step:
            return False
        if any(isinstance(c, GracefulStop) and c.stopping for c in getattr(trainer, "callbacks", [])):
            return False
        return trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trainer is not None and not trainer.sanity_checking:
            self._last_valid_s, self._validated, self._owed = self._clock() if self._timed else 0.0, True, False
            self._validated_step = trainer.global_step

    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        training = trainer is not None and trainer.training and not trainer.validating
        owed = (
            trainer is not None
            and training
            and (self._due(lightning_data_fetcher(trainer)) or self._final_due(trainer))
        )
        return {
            "last_valid_s": self._last_valid_s,
            "validated": self._validated,
            "validation_owed": owed,
            "validated_step": self._validated_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_valid_s = float(state_dict.get("last_valid_s", 0.0))
        self._validated = bool(state_dict.get("validated", False))
        self._restored = "validated" in state_dict
        self._owed = self._owed or bool(state_dict.get("validation_owed", False))  # (`on_load_checkpoint` came first.)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint at `max_steps` that owes a validation (the final one, skipped by a signal in the last step):
        Lightning's fit loop, finding `max_steps` reached, would end before its epoch loop starts, and the relaunch
        would end without it. The fit loop is let start with one step more (set where Lightning's own tuner sets
        it); the limit is put back as the epoch starts (`on_train_epoch_start`), and the epoch loop, restarted with
        a validation to run first (`validate_before_next_batch`), runs it and ends without training: with
        `max_steps` reached, it is done after its first iteration, the validation (even one that finds no batch).
        `last.ckpt` is then written after that validation, as an uninterrupted run writes it, so a later relaunch
        does nothing new; the random state, data position and weights are the checkpoint's, so the validation's
        values are the uninterrupted run's. A relaunch that lowers `max_steps` to the checkpoint's step, which was
        not validated, owes that final validation too (the checkpoint was written for a longer run)."""
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        step = int(checkpoint.get("global_step", 0))
        at_max = trainer.enable_validation and 0 < trainer.max_steps <= step
        if at_max and state.get("validated_step", step) != step:  # (Older checkpoints do not say: as validated.)
            self._owed = True
        if at_max and (state.get("validation_owed") or self._owed):
            self._max_steps = trainer.max_steps
            trainer.fit_loop.epoch_loop.max_steps = step + 1

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_max_steps(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_max_steps(trainer)  # (Also where fit failed before the epoch started.)

    def _restore_max_steps(self, trainer: pl.Trainer) -> None:
        if self._max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps, self._max_steps = self._max_steps, None


def end_live_lines(trainer: pl.Trainer) -> None:
    """Ends a terminal logger's live training line, so that a message printed next is not glued onto it."""
    for logger in trainer.loggers:
        if isinstance(logger, StdoutLogger):
            logger.end_live_line()


class CheckpointsInRun(StepFreeCallback):
    """Gives a `ModelCheckpoint` of the user's without a `dirpath` the run's `checkpoints/` (Lightning would put it
    under the first logger's name, `<run>/stdout/checkpoints/`, where `validate --ckpt_path` sees no run). It is the
    first callback: its `setup` comes before theirs, which resolve the directory."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(self.ckpt_dir)


class FinalCheckpoint(StepFreeCallback):
    """Writes `<exp_dir>/checkpoints/last.ckpt` when training ends, however it ends at a step boundary."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # With the training weights: resumed exactly.
        if trainer.is_global_zero:
            end_live_lines(trainer)  # The loggers' `finalize`, which also ends it, comes after this callback.
            print(f"Saved checkpoint {self.path}", flush=True)
        set_optimizer_mode(trainer.optimizers, train=False)  # See `CountsBatches.on_train_end`.


class GracefulStop(StepFreeCallback):
    """Signals act at the end of the current optimizer step, never inside the handler:

    - SIGINT (Ctrl-C) and SIGTERM stop training; the final checkpoint is written and the process exits
      with 128 + the signal number. A second SIGINT aborts at once.
    - SIGUSR1 writes a checkpoint; inside a Slurm job it then requeues the job and stops (the requeued job
      resumes from that checkpoint), otherwise training goes on.

    A terminal, Slurm and Kubernetes signal the whole process group: mlfab's dataloader workers leave these
    signals to this process (`mlfab.data.worker_init`), which stops them itself after the checkpoint. In DDP
    every rank acts at the same step.
    """

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self.stopping = False  # A signal stops training (SIGINT, SIGTERM, or SIGUSR1 with a requeued Slurm job).
        self._save_requested = False
        self._distributed = False
        self._previous: dict[int, Any] = {}
        self._trainer: pl.Trainer | None = None  # The Trainer training, which the handler asks whether it ended.
        self._stage: str | None = None  # What the Trainer runs: fit, validate, test or predict.
        self._hold_sigusr1()

    def _hold_sigusr1(self) -> None:
        """In a Slurm job SIGUSR1 is held from the Trainer's start to each run's end (a fit, then a test in the same
        Trainer: from its setup again). Slurm's SIGUSR1 can come before training starts (a short time limit, a slow
        start), and by default it kills the job: kept until then, it checkpoints and requeues at the first step."""
        main = threading.current_thread() is threading.main_thread()
        if in_slurm_job() and main and signal.SIGUSR1 not in self._previous:
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1 and self._stage not in (None, "fit"):  # Only held in a Slurm job.
            print(f"\nSIGUSR1: only training checkpoints and requeues the job; {self._stage} goes on.", file=sys.stderr)
            return
        if signum == signal.SIGUSR1:
            self._save_requested = True
            return
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_received = signum
        trainer = self._trainer
        ended = trainer is not None and (trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step)
        what = "training has ended; its final validation and checkpoint finish" if ended else "stopping after this step"
        if trainer is not None and not trainer.is_global_zero:  # A group's signal reaches every rank: said once.
            return
        print(
            f"\n{signal.Signals(signum).name}: {what}"
            + ("" if ended else " and saving a checkpoint")
            + (" (Ctrl-C again to abort)." if signum == signal.SIGINT else "."),
            file=sys.stderr,
            flush=True,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn ("fit", "validate", ...).
        self._hold_sigusr1()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._distributed, self.stopping, self._trainer = trainer.world_size > 1, False, trainer
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                previous = signal.signal(signum, self._handler)
                self._previous.setdefault(signum, previous)  # (Not SIGUSR1's own handler, set up in a Slurm job.)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (self.signal_received is not None or self._save_requested or self._distributed) and step_ends(trainer):
            self._act(trainer)  # The common case costs two attribute reads.

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A signal that came during a validation inside `fit` acts when it ends (at the step it followed), not one
        optimizer step later; during the final validation, training ends anyway (and the signal stopped nothing)."""
        ending = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not ending:
            self._act(trainer)

    def _act(self, trainer: pl.Trainer) -> None:
        stop, save = self.signal_received is not None, self._save_requested
        if not (stop or save or self._distributed):
            return
        if trainer.world_size > 1:  # Every rank must act at the same step: one all-reduce for the signal and save.
            flags = torch.tensor([float(self.signal_received or 0), float(save)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            stop, save = bool(flags[0]), bool(flags[1])
            if (
                stop and self.signal_received is None
            ):  # Another rank's signal (rank zero did not say it): its exit code.
                self.signal_received = int(flags[0])
                if trainer.is_global_zero:
                    name = signal.Signals(self.signal_received).name
                    print(
                        f"\n{name} (to another rank): stopping after this step and saving a checkpoint.",
                        file=sys.stderr,
                    )
        last = 0 < trainer.max_steps <= trainer.global_step  # Training ends at this step anyway.
        if save:  # (Also with a stop in the same step: a Slurm job is still requeued, from this checkpoint.)
            self._save_requested = False
            path = Path(trainer.default_root_dir) / "checkpoints" / f"signal_step_{trainer.global_step:08d}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                end_live_lines(trainer)
                ends = "; this step ends training, so the job is not requeued" if last and in_slurm_job() else ""
                print(f"SIGUSR1: saved checkpoint {path}{ends}", file=sys.stderr, flush=True)
            if not last:  # A requeued finished job would skip the final validation and train nothing.
                requeued = after_signal_checkpoint(trainer.global_rank)  # In a Slurm job: requeue, then stop.
                if trainer.world_size > 1:  # Only rank zero knows whether `scontrol requeue` worked.
                    requeued = trainer.strategy.broadcast(requeued, src=0)
                stop = stop or requeued
        if stop:
            trainer.should_stop = self.stopping = True
            if last and trainer.is_global_zero and trainer.limit_val_batches != 0:
                print(
                    "The final model is not validated yet: the signal came in the last step, and the checkpoint comes "
                    f"first. Relaunch into this run (exp_dir={trainer.default_root_dir}) to run that validation: it "
                    f"resumes from {Path(trainer.default_root_dir) / 'checkpoints' / 'last.ckpt'}, validates, logs it "
                    "into this run and ends.",
                    file=sys.stderr,
                    flush=True,
                )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class PredictionWriter(BasePredictionWriter):
    """Saves what the `predict` subcommand computed: `<exp_dir>/predictions/step_<N>.pt` (N: the step of the weights),
    one file per process under DDP (`step_<N>.rank<R>.pt`), with `torch.save`: `{"predictions": [one entry per
    batch, on the CPU], "batch_indices": [the dataset indices of each batch's samples, where known]}`."""

    def __init__(self, predictions_dir: Path) -> None:
        super().__init__(write_interval="epoch")
        self.predictions_dir = predictions_dir
        self.written: Path | None = None

    @override
    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        step = getattr(pl_module, "weights_step", trainer.global_step)
        rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        path = self.written = self.predictions_dir / f"step_{step:08d}{rank}.pt"
        # Lightning nests both per dataloader only with several; batch indices always. (A batch's own predictions
        # may be a list: that says nothing about the nesting.)
        several = len(batch_indices) > 1 and isinstance(batch_indices[0], list)
        outputs = predictions[0] if several else predictions
        indices = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        torch.save({"predictions": move_data_to_device(outputs, "cpu"), "batch_indices": indices}, path)
        print(f"Predictions of {len(outputs)} batches: {path}", flush=True)


class TrainingEndsOnError(StepFreeCallback):
    """Calls an mlfab task's `on_training_end(state)` when training fails once it has started (Lightning calls
    `on_train_end` only when it ends normally), as mlfab 0.2 did: an exception in a training step, in a validation
    within `fit`, in a callback, or in a checkpoint written at the end. Each task's Trainer gets one, as its last
    callback (`Task.setup`, whatever the task's `configure_callbacks` returns), so its `on_train_end` runs right before
    the task's, which calls `on_training_end` when training ends normally: it is called once either way."""

    def __init__(self) -> None:
        self._running = False  # Between on_train_start and the on_train_end the task's own follows.

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._running = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._running = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not self._running:
            return
        self._running = False
        end = getattr(pl_module, "_end_training", None)
        if callable(end):  # An mlfab task (any other LightningModule has none).
            end(failed=True)


@contextlib.contextmanager
def signals_passed_to_spawned() -> Iterator[None]:
    """While the launching process of a spawn-based strategy (`ddp_spawn`) waits for the processes it started, which
    train and have their own `GracefulStop`: a SIGTERM or SIGUSR1 to it is passed on to them (they stop or save, and
    the launcher reports rank zero's outcome), not the end of it, and SIGINT, which a terminal sends to the whole
    group, is left to them. (A signal to the whole group reaches them twice: a second SIGTERM or SIGUSR1 adds
    nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)  # type: ignore[arg-type]

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class CountsBatches(StepFreeCallback):
    """Has an mlfab task count each batch's samples (`Task._count`) before any other batch-start hook runs (it is
    the first callback, and callbacks run before the module), on the batch they all get: after every transfer hook,
    the task's or a LightningDataModule's. A value logged in those hooks then weighs as its batch. In training only
    under gradient accumulation: a step of one batch has one weight."""

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module._count(batch, "train")

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        pl_module._count(batch, "valid", *args)

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        pl_module._count(batch, "test", *args)

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        pl_module._count(batch, "predict", *args)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """The trained task holds the evaluation weights (of a schedule-free optimizer) before any other callback's
        `on_train_end`, so one that sets weights there (StochasticWeightAveraging's average, a best-weights restore)
        has the last word; mlfab's final checkpoint, next in order, switches once it has saved the training weights."""
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(c, FinalCheckpoint) for c in callbacks):
            set_optimizer_mode(trainer.optimizers, train=False)


def may_accumulate(trainer: pl.Trainer) -> bool:
    """Whether a step of this fit may take several batches: a GradientAccumulationScheduler sets the Trainer's count
    at each epoch's start, after the fit's setup and `on_train_start`."""
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    return trainer.accumulate_grad_batches > 1 or any(isinstance(c, GradientAccumulationScheduler) for c in callbacks)


def first_counts_batches(trainer: pl.Trainer) -> None:
    """Makes a `CountsBatches` the first of the Trainer's callbacks (its list, changed in place), and the only one,
    followed by mlfab's `FinalCheckpoint`; its training hook is off where every step is one batch."""
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    found = [c for c in callbacks if isinstance(c, CountsBatches)]
    counter = found[0] if found else CountsBatches()
    final = [c for c in callbacks if isinstance(c, FinalCheckpoint)]  # Second: see `CountsBatches.on_train_end`.
    callbacks[:] = [counter, *final] + [c for c in callbacks if c not in found and c not in final]
    counter.__dict__.pop("on_train_batch_start", None)
    if not may_accumulate(trainer):
        counter.on_train_batch_start = None  # type: ignore[assignment,method-assign]  # Lightning skips it.


def last_training_ends_on_error(callbacks: list[Any]) -> None:
    """Makes a `TrainingEndsOnError` the last of `callbacks` (a Trainer's list, changed in place), and the only one."""
    found = [c for c in callbacks if isinstance(c, TrainingEndsOnError)]
    callbacks[:] = [c for c in callbacks if c not in found] + [found[0] if found else TrainingEndsOnError()]


def monitored_training_tags(trainer: pl.Trainer) -> list[str]:
    """The tags (`loss/loss`) of the training metrics (`train/loss/loss`) that a callback (ModelCheckpoint,
    EarlyStopping: any with a `monitor`) or a learning-rate scheduler (`ReduceLROnPlateau`'s `monitor`) reads."""
    monitors = [getattr(c, "monitor", None) for c in trainer.callbacks]  # type: ignore[attr-defined]
    monitors += [config.monitor for config in trainer.lr_scheduler_configs]
    return sorted({m.removeprefix("train/") for m in monitors if isinstance(m, str) and m.startswith("train/")})
