"""`mlfab.Task`: a LightningModule you configure with a dataclass and fill in with four methods.

A task implements `get_dataset(phase)`, `forward` and/or `get_loss(batch, state)`, and optionally
`log_train_step` / `log_valid_step`. mlfab turns those into Lightning's dataloader and step hooks,
builds the default optimizer from the config, and writes everything passed to `log_*` lazily to every
attached logger. `Task.launch(Config(...))` runs it; `lightning.pytorch.Trainer().fit(task)` works too.
"""

import dataclasses
import functools
import inspect
import numbers
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, Generic

import lightning.pytorch as pl
import numpy as np
import torch
from dpshdl.dataset import Dataset as DpshdlDataset
from lightning.fabric.utilities.data import has_len
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from mlfab._lightning import (
    FastFxName,
    lightning_validates_now,
    metric_step_value,
    next_epoch_from_here,
    precompute_step_signatures,
    publish_metrics,
    restricted_classmethod,
    step_ends,
    uploads_checkpoints,
    withhold_from_loggers,
)
from mlfab.checkpoints import (
    around_saves,
    check_compatible,
    damage,
    gather_rng_states,
    own_rng_state,
    restore_rng_states,
    task_id,
)
from mlfab.cli.parser import launch
from mlfab.compiling import Compiled
from mlfab.config import Config, ConfigT, build_config, check_config, to_dict
from mlfab.data import DpshdlIterable, build_dataloader, check_dataset, explain_dataset_failure, to_device
from mlfab.declaration import find_config_class, prepare_subclass, task_work_due
from mlfab.errors import CheckpointError, ConfigError, TaskDefinitionError
from mlfab.loader import Consumed, MlfabLoader
from mlfab.loggers.base import MlfabLogger
from mlfab.loggers.dispatch import flush_logs
from mlfab.loggers.stdout import StdoutLogger
from mlfab.loggers.tensorboard import TensorboardLogger
from mlfab.logs import media
from mlfab.logs.api import LogMethods
from mlfab.logs.buffer import PREDICT, Cadence, LogBuffer
from mlfab.nonfinite import NonFiniteGuard, SkipStep, loss_parts
from mlfab.optim import (
    checks_optimizer_reads,
    lightning_optimizers,
    refuse_rate_taken_within_warmup,
    save_in_eval_mode,
    schedule_free_adamw,
    set_optimizer_mode,
    use_training_weights,
    warm_up,
)
from mlfab.resume import apply_optimizer_changes, check_changes, config_changes, describe
from mlfab.run.callbacks import (
    ValidationCadence,
    first_counts_batches,
    last_training_ends_on_error,
    may_accumulate,
    monitored_training_tags,
)
from mlfab.run.distributed import broadcast_exp_dir, mean_over_ranks, union_over_ranks
from mlfab.run.quiet import quiet_log_interval_warning
from mlfab.run.slurm import job_arguments
from mlfab.run.trainer import DATA_KEYS, built_by_mlfab, refuse_under_manual_optimization, unread_settings, unseeded
from mlfab.state import PHASES, LogPhase, Phase, State

NUMPY_VALUES = (np.generic, np.ndarray)  # Built once: `self.log` checks every value against it.


class Task(FastFxName, LogMethods, pl.LightningModule, Generic[ConfigT]):  # FastFxName: see mlfab/_lightning.py.
    default_namespace = "value"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        prepare_subclass(cls, Task)
        cls.configure_optimizers = checks_optimizer_reads(cls.configure_optimizers)  # type: ignore[method-assign]

    @classmethod
    def config_class(cls) -> type[Config]:
        config_cls = find_config_class(cls, Task)
        if config_cls is None:
            raise TaskDefinitionError(
                f"{cls.__name__} does not say which config it uses, so mlfab cannot build one. Declare it "
                f"with the config class as the generic argument, e.g.\n\n"
                f"    @dataclass(kw_only=True)\n    class Config(mlfab.Config):\n        ...\n\n"
                f"    class {cls.__name__}(mlfab.Task[Config]):\n        ..."
            )
        return config_cls

    def __init__(self, config: ConfigT) -> None:
        super().__init__()
        config_cls = self.config_class()  # Fails early, with the fix, if the task names no config.
        built = isinstance(config, Mapping)
        if isinstance(config, Mapping):  # Plain data, e.g. hyperparameters from a checkpoint: checked as it is built.
            config = build_config(config_cls, config)
        if getattr(config, "batch_size", 0) is None:
            config.batch_size = self.get_batch_size()  # mlfab 0.2: the task gives the batch size.
            built = False  # That batch size is checked too.
        if not built:
            check_config(config)  # A Config built in Python: its values' ranges (mlfab.config.RULES).
        self.config: ConfigT = config
        # Plain data only, so checkpoints load under torch's `weights_only=True`.
        self.save_hyperparameters({"config": to_dict(config)})
        self._exp_dir: Path | None = None
        self._mlfab_loggers: list[Any] = []
        # A buffer per phase (validation may start mid-accumulation), and one for what is logged during predict.
        self._log_buffers = {phase: LogBuffer(phase) for phase in (*PHASES, PREDICT)}
        self._bad_data_seen = self._bad_data_asked = False
        self._evaluated = [0, 0]  # The batches of the evaluation in progress: evaluated, and failed to collate.
        # Where an evaluation has several dataloaders: the loader each tag was logged from, the batch's loader, and
        # how many there are (`_watch_loaders`); None where it has one.
        self._loader_of: list[Any] = [None, 0, 1]
        self._counted: list[Any] = [None, 0]  # The batch counted before its hooks, until its step reads it.
        self._log_cadence = Cadence()
        self._start_counts()
        self._consumed = Consumed()  # Batches trained, so the loader knows which ones are still in flight.
        self._nonfinite = NonFiniteGuard(config.max_nonfinite_steps_in_a_row)
        self._compiled: Compiled | None = None  # The `compile` key, applied at setup.
        self._last_losses: dict[str, Tensor] = {}
        self._rate_logged = [False]  # Whether this optimizer step's rate is logged yet.
        # The sum of this step's batches' losses, each weighted by its samples, for the non-finite check and
        # on_step_end (kept only where a step has several batches or on_step_end is overridden).
        self._step_losses: dict[str, Tensor] | None = None
        self._step_weight = 0  # The samples of the step's batches so far, which `_step_losses` are weighted by.
        self._step_samples: tuple[int, int] | None = None  # The step's first batch's samples and its total so far.
        self._training_over = False  # `set_training_over()` was called.
        self._cadence: ValidationCadence | None = None  # mlfab's validation decision, when its Trainer has one.
        self._monitored: list[str] = []  # Training tags a callback or scheduler reads: published at every step.
        self._valid_unwritten: Callable[[], None] | None = None  # Writes the last validation where it was skipped.
        # The evaluation in progress, once its scalars are in Lightning's metrics: their sample counts and values.
        self._evaluation: tuple[dict[str, Any], dict[str, float]] | None = None
        self._step_started = False  # `on_step_start` ran for the step in progress.
        self._metric_names: set[str] = set()  # What this task `self.log`s for Lightning (not for its loggers).
        self._lightning_names: set[str] = set()  # What the task's own code `self.log`s (see `log`).
        # Of those, the ones logged in an evaluation with on_step, which Lightning reduces into `<name>_epoch`.
        self._split_names: set[str] = set()
        self._weights_from_checkpoint = False  # Evaluation weights loaded for validate/test: no mode switch.
        self._checkpoint_step = 0  # The step of those weights, which their evaluation is logged at.
        self._pending_rng: list[dict[str, Any]] | None = None
        self._loader_states: list[Any] | None = None  # The training loader's, from the checkpoint resumed from.
        self._rng_at_end: dict[str, Any] | None = None  # The random state where training ended.
        self._resume_changes: dict[str, tuple[Any, Any]] = {}  # Config changes since the checkpoint we resume from.
        self._optimizer_args: dict[str, Any] | None = None  # The command line's --optimizer / --lr_scheduler.

    # ----------------------------------------------------------------------------------------------------------------
    # What a task implements.

    def get_dataset(self, phase: Phase) -> Any:
        """Returns the dataset for `phase`: a dpshdl Dataset, a torch Dataset or a torch IterableDataset."""
        raise TaskDefinitionError(
            f"{type(self).__name__} must implement `get_dataset(self, phase)`, returning the dataset for "
            f"phase 'train' and 'valid' (a dpshdl Dataset, a torch Dataset or a torch IterableDataset)."
        )

    def get_loss(self, batch: Any, state: State) -> Tensor | dict[str, Tensor]:
        """Returns the loss: a scalar Tensor, or a dict of them (summed for backward, each logged)."""
        output = self(batch)
        self.log_step(batch, output, state)
        return output

    def log_step(self, batch: Any, output: Any, state: State) -> None:
        """Calls `log_train_step` in training, `log_valid_step` in validation and testing, without autograd (as mlfab
        0.2): a value logged from the output keeps no graph until it is written."""
        with torch.no_grad():
            if state.phase == "train":
                self.log_train_step(batch, output, state)
            else:
                self.log_valid_step(batch, output, state)

    def log_train_step(self, batch: Any, output: Any, state: State) -> None:
        """Override to log values on training steps (`self.log_scalar(...)`, ...)."""

    def log_valid_step(self, batch: Any, output: Any, state: State) -> None:
        """Override to log values on validation steps."""

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return to_device(batch, device)  # Lightning's move, also of a frozen dataclass (which Lightning refuses).

    def _count(self, batch: Any, phase: LogPhase, batch_idx: int = 0, loader: int = 0) -> None:
        """A batch's samples, counted before its batch-start hooks (by `CountsBatches`, the first callback), which
        may log for it: those values weigh as the batch. Also the batch's dataloader, where there are several."""
        self._loader_of[1] = loader
        if batch is not None:
            self._counted[:] = batch, self.get_num_samples(batch)  # (In place: a Module's attributes are slow to set.)
            if phase != "train" or self._accumulates():
                self._log_buffers[phase].weigh(self._counted[1])

    def _accumulates(self) -> bool:
        """Whether a training step has several batches: only then can its values come from batches of two sizes."""
        return self._trainer is not None and self._trainer.accumulate_grad_batches > 1

    def _samples(self, batch: Any, phase: LogPhase | None) -> int:
        """`get_num_samples(batch)`, counted once, before its batch-start hooks; a batch `CountsBatches` did not see
        is counted now, and what `phase` logs weighs as it from now on. The count lets go of the batch: a training
        batch is not kept on the device through the validation that follows it."""
        counted, samples = self._counted
        self._counted[0] = None
        if counted is not batch:
            samples = self.get_num_samples(batch)
            if phase is not None:
                self._log_buffers[phase].weigh(samples)
        return samples

    def get_num_samples(self, batch: Any) -> int:
        """The number of samples in `batch`, which weighs the scalars logged for it in the mean over a validation
        run (and over a step's accumulated batches): by default the leading dimension of the first tensor or array
        in it (depth first), or 1. Override it where that is not the number of samples."""
        return next(_leading_dims(batch), 1)

    def get_batch_size(self) -> int:
        """The batch size when the config leaves `batch_size` unset (None), as in mlfab 0.2."""
        raise TaskDefinitionError(
            f"{type(self).__name__}'s config has no batch_size: set it, or override `get_batch_size(self) -> int`."
        )

    def get_prediction(self, batch: Any) -> Any:
        """What `predict` returns for a batch (Lightning's `predict_step` calls it): by default the model's output
        for the batch's inputs, `self(batch[0])` for a tuple or list batch (inputs first, then targets, as an
        `(x, y)` dataset gives them) and `self(batch)` for any other. Override it for anything else."""
        first = isinstance(batch, tuple | list)
        try:
            return self(batch[0] if first else batch)
        except Exception as e:  # The batch as the loader gives it: the task's own preparation is in its get_loss.
            call = "self(batch[0])" if first else "self(batch)"
            e.add_note(f"(In Task.get_prediction's default, {call}: override {type(self).__name__}.get_prediction("
                       "batch) to prepare the batch as get_loss does.)")  # fmt: skip
            raise

    def set_loggers(self) -> None:
        """Attaches loggers with `add_logger`; by default stdout and TensorBoard under `exp_dir`."""
        self.add_logger(StdoutLogger(), TensorboardLogger(self.exp_dir))

    def add_logger(self, *loggers: Any) -> None:
        self._mlfab_loggers.extend(loggers)

    def get_optimizer_builder(self) -> Callable[[nn.Module], Any]:
        """What `build_optimizer` calls with the model (as in mlfab 0.2): schedule-free AdamW from the config."""
        c = self.config
        return functools.partial(
            schedule_free_adamw, lr=c.learning_rate, betas=c.betas, weight_decay=c.weight_decay,
            warmup_steps=c.warmup_steps,
        )  # fmt: skip

    def build_optimizer(self, model: nn.Module | None = None) -> Any:
        """The optimizer `configure_optimizers` uses: `get_optimizer_builder()(model)`. Return an optimizer, an
        `(optimizer, scheduler)` pair (the scheduler steps after every optimizer step) or anything Lightning's
        `configure_optimizers` may return. mlfab 0.2's `build_optimizer(self, model)` works too."""
        return self.get_optimizer_builder()(self if model is None else model)

    # mlfab 0.2's hooks, called at the same points of training (with the `State` of that moment).

    def on_training_start(self, state: State) -> None:
        """When training starts (after a resume's state was restored)."""

    def on_training_end(self, state: State) -> None:
        """When training ends, however it ends (also after an exception)."""

    def on_step_start(self, state: State) -> None:
        """Before each optimizer step (before the first of its accumulated batches); `state.num_steps` is the number
        of steps done."""

    def on_step_end(self, state: State, loss_dict: dict[str, Tensor]) -> None:
        """After each optimizer step, with its losses (detached; the mean over its batches under batches_per_step)."""

    def task_state_dict(self) -> dict[str, Any]:
        """State of your own to keep in checkpoints (tensors and plain data), handed back on resume and by
        `load_from_checkpoint` to `load_task_state_dict_` (as in mlfab 0.2)."""
        return {}

    def load_task_state_dict_(self, state_dict: dict[str, Any]) -> None:
        """Restores what `task_state_dict` returned when the checkpoint was saved."""

    def on_before_save_ckpt(self, ckpt_path: Path) -> None:
        """Before a checkpoint is written to `ckpt_path` (on the process that writes it)."""

    def on_after_save_ckpt(self, ckpt_path: Path) -> None:
        """After the checkpoint at `ckpt_path` was written in full (with its checksum, where mlfab writes it)."""

    def set_training_over(self) -> None:
        """Ends training after the current optimizer step (it is logged, validated and saved as a last step is)."""
        self._training_over = True

    # ----------------------------------------------------------------------------------------------------------------
    # Run information.

    @property
    def exp_dir(self) -> Path:
        """This run's directory (checkpoints, logs, config.yaml)."""
        if self._exp_dir is not None:
            return self._exp_dir
        if self._trainer is not None:  # A Trainer built elsewhere: its directory (its `default_root_dir`).
            return Path(self.trainer.default_root_dir)
        if self.config.exp_dir:
            return Path(self.config.exp_dir).expanduser()
        raise RuntimeError(
            f"{type(self).__name__}.exp_dir is only known once the task runs: use it in set_loggers or later, "
            "or set exp_dir in the config."
        )

    @property
    def weights_step(self) -> int:
        """The step the weights are from: the global step, or in `validate` / `test` / `predict` of a checkpoint the
        checkpoint's (Lightning restores no loop there, so its global step is 0)."""
        return self._checkpoint_step if self._weights_from_checkpoint else self.global_step

    def state(self, phase: Phase) -> State:
        return State(
            num_steps=self.weights_step,
            num_samples=self._num_samples,
            num_valid_steps=self._num_valid_steps,
            phase=phase,
            start_time_s=self._start_time_s,
            elapsed_time_s=self.elapsed_time_s,
        )

    @property
    def elapsed_time_s(self) -> float:
        return self._elapsed_before_s + time.monotonic() - self._session_start_s

    @property
    def nonfinite_guard(self) -> NonFiniteGuard:
        """What skips steps with a non-finite loss or gradient (mlfab/nonfinite.py): the steps skipped so far
        (`total`, `last_skip`) and the last gradient norm it computed, which the `optim/grad_norm` diagnostic reads."""
        return self._nonfinite

    # ----------------------------------------------------------------------------------------------------------------
    # Logging: the `log_*` methods (mlfab/logs/api.py) store values in the current phase's buffer.

    def _phase(self) -> LogPhase:
        trainer = self._trainer
        if trainer is None:
            return "train"
        stage = trainer.state.stage  # `is`, not `trainer.training`: its enum `==` costs ~1-5 us per log_* call.
        if stage is RunningStage.TRAINING:
            return "train"
        if stage is RunningStage.TESTING:
            return "test"
        return PREDICT if stage is RunningStage.PREDICTING else "valid"

    def _log(self, kind: str, key: str, value: Any, namespace: str | None) -> None:
        phase, tag = self._phase(), f"{namespace or self.default_namespace}/{key}"
        if self._loader_of[0] is not None and phase != "train":
            self._refuse_tag_of_several_loaders(phase, tag, key)
        self._log_buffers[phase].add(kind, tag, value)

    @override
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `self.log` (and `log_dict`): for Lightning as always (callbacks, its loggers), and also into
        mlfab's logs under `name`, so mlfab's loggers write it in the phase and at the step it was logged for, at
        their own cadence: a training value is the step's (averaged over accumulated batches), an evaluation value
        the one Lightning reduces over the whole evaluation (its `reduce_fx`, `batch_size`, `sync_dist`).
        `value`: a one-element tensor, a real number (Python's, a numpy scalar or 0-d array) or a torchmetrics Metric;
        anything else is refused with a TypeError."""
        given = value
        if isinstance(value, NUMPY_VALUES) and np.ndim(value) == 0:  # Lightning refuses 0-d arrays.
            value = value.item()
        if not isinstance(value, Tensor | numbers.Real) and not callable(getattr(value, "compute", None)):
            raise TypeError(
                f"self.log({name!r}, ...) got a {type(given).__name__}: mlfab logs a real number, a one-element tensor "
                "or a torchmetrics Metric under each name. For several values, use self.log_dict({name: value, ...})."
            )
        super().log(name, value, *args, **kwargs)
        to_loggers = args[1] if len(args) > 1 else kwargs.get("logger")
        if name in self._metric_names or to_loggers is False or self._trainer is None or self.trainer.sanity_checking:
            return
        phase = self._phase()
        added = args[8] if len(args) > 8 else kwargs.get("add_dataloader_idx", True)
        if self._loader_of[0] is not None and self._loader_of[1] is not None and phase != "train" and added:
            name = f"{name}/dataloader_idx_{self._loader_of[1]}"
        self._lightning_names.add(name)
        if phase != "train" and (args[2] if len(args) > 2 else kwargs.get("on_step")):
            self._split_names.add(name)
        if isinstance(value, Tensor):
            value = value.detach()
        elif not isinstance(value, numbers.Real):  # A torchmetrics Metric: the step's value, or computed when written.
            step_value = metric_step_value(value) if phase == "train" else None
            value = value.compute if step_value is None else step_value
        self._log_buffers[phase].add("scalar", name, value)

    def _loss_total(self, loss: Any, phase: Phase, batch: Any) -> Tensor:
        """The loss to backpropagate; each part is logged under `loss/<name>`."""
        task = type(self).__name__
        reduced = per_sample_reduced(loss, lambda: self.get_num_samples(batch), task)
        self._last_losses = parts = loss_parts(reduced, task)
        if self._step_losses is not None and phase == "train":
            sums, weight = self._step_losses, self._log_buffers["train"].weight  # Its samples (under accumulation).
            for name, part in parts.items():  # In float32: a sum of half-precision losses would overflow to inf.
                part = part.detach().float() * weight
                sums[name] = sums[name] + part if name in sums else part
            self._step_weight += weight
        buffer = self._log_buffers[phase]
        for name, part in parts.items():
            buffer.add("scalar", f"loss/{name}", part.detach())
        values = list(parts.values())
        return values[0] if len(values) == 1 else torch.stack([v.reshape(()) for v in values]).sum()

    def _flush_logs(
        self, phase: LogPhase, step: int, everywhere: bool = False, publish: Callable[..., Any] | None = None
    ) -> Callable[[], None] | None:
        return flush_logs(
            self.trainer,
            self._log_buffers[phase],
            self._log_cadence,
            phase=phase,
            step=step,
            elapsed_time_s=self.elapsed_time_s,
            num_samples=self._num_samples,
            publish=publish or self._publish,
            lightnings_own=self._lightning_names,
            everywhere=everywhere,
        )

    def _publish(self, phase: LogPhase, means: dict[str, float], weights: dict[str, Any]) -> dict[str, float]:
        """Puts a flush's scalars into Lightning's metrics as `<phase>/<namespace>/<key>`; returns what to write.

        Validation and test: `self.log` once per key at the evaluation's end, with the run's sample-weighted mean
        and its sample count, synchronised over ranks by Lightning (so the value is the weighted mean over every
        rank's samples, as Lightning's own `self.log(..., batch_size=n, sync_dist=True)` gives it); they reach
        callbacks from `on_validation_end` on and `validate` / `test` return them. Training: the scalars of the
        steps mlfab resolves anyway (a logger writes them), written into the metrics directly (see
        `publish_metrics`), so a lazy value is never computed for Lightning's sake."""
        trainer = self.trainer
        own = self._lightning_names  # Lightning's already, from the task's `self.log`.
        if trainer.barebones or (phase == "train" and not means):
            return means
        if phase == "train":
            kept = {f"train/{tag}": v for tag, v in means.items() if tag not in own}
            publish_metrics(trainer, {name: torch.tensor(v, dtype=torch.float64) for name, v in kept.items()})
            return means
        # A value only some ranks logged: the mean of theirs. Lightning's own on any rank: its reduction, on each.
        tags, lightnings = union_over_ranks(trainer, means, own.intersection(means))
        if phase == PREDICT:  # Lightning keeps no metrics in predict (its `self.log` refuses to run there).
            return mean_over_ranks(trainer, means, weights, self.device, tags=tags)
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64.
        mine = [tag for tag in tags if tag not in lightnings]
        for tag in mine:
            name = f"{phase}/{tag}"
            self._metric_names.add(name)
            self.log(  # Where this rank has none, a weight of 0 (the other ranks' mean).
                name,
                torch.tensor(means.get(tag, 0.0), dtype=dtype, device=self.device),
                on_step=False,
                on_epoch=True,
                batch_size=float(weights.get(tag, 0)),  # An int count would be floored when averaged over ranks.
                sync_dist=True,
            )
        if not mine and not own.intersection(means):
            return means
        computed = trainer.callback_metrics  # Computed (and synchronised) once here, as Lightning would later.
        out = {tag: float(computed[f"{phase}/{tag}"]) for tag in mine}
        for tag in own.intersection(means):  # Lightning's reduction; the mean over batches if it made none.
            name, per_loader, loader = tag.partition("/dataloader_idx_")  # Lightning: `x_epoch/dataloader_idx_0`.
            epoch_name = f"{name}_epoch{per_loader}{loader}" if tag in self._split_names else tag
            out[tag] = float(computed.get(epoch_name, means[tag]))
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks. Those with mlfab's work in them start with `task_work_due`: a task's override runs that work
    # whether or not it calls super() (mlfab.declaration.MLFAB_HOOKS).

    def _dataloader(self, phase: str) -> DataLoader:
        try:
            dataset = self.get_dataset(phase)  # type: ignore[arg-type]
            for fallback in {"test": ["valid"], "predict": ["test", "valid"]}.get(phase, []):
                if dataset is None:
                    phase, dataset = fallback, self.get_dataset(fallback)  # type: ignore[arg-type]
        except Exception as e:
            explain_dataset_failure(e, type(self).__name__, phase)
            raise
        dataset = check_dataset(dataset, phase, type(self).__name__)
        self._check_own_collate(dataset, phase)
        return build_dataloader(
            dataset,
            phase=phase,
            batch_size=self.config.batch_size,  # type: ignore[arg-type]  # (None is replaced at __init__.)
            num_workers=self.config.num_dataloader_workers,
            pin_memory=self._trainer is not None and self.trainer.strategy.root_device.type == "cuda",
            max_bad_in_a_row=self.config.max_bad_samples_in_a_row,
            consumed=self._consumed,
            seed=self.config.seed,
            rank=self.global_rank,
            world_size=self.trainer.world_size if self._trainer is not None else 1,
        )

    def _check_own_collate(self, dataset: Any, phase: str) -> None:
        """A `collate` written on the task is refused unless the dataset collates with it: mlfab collates with the
        dataset's own (`Collate`), and would never call it."""
        own = next((name for name in ("collate", "collate_fn") if callable(getattr(self, name, None))), None)
        if own is None:
            return
        used = getattr(dataset, "collate", None)
        if getattr(used, "__func__", None) is DpshdlDataset.collate:  # dpshdl's default, which every dataset has.
            used = None
        if used != getattr(self, own):
            name, kind = type(self).__name__, type(dataset).__name__
            which = f"{kind}'s own collate is used" if callable(used) else f"{kind} has none: the default is used"
            raise TaskDefinitionError(
                f"{name}.{own} would never be called: mlfab collates the batches of get_dataset({phase!r}) with the "
                f"dataset's `collate` ({which}). Move it onto the dataset, or hand it over: `dataset.collate = "
                f"self.{own}`."
            )

    @override
    def setup(self, stage: str) -> None:
        if not task_work_due(self, "setup"):
            return
        media.forget_warnings()  # Each run says each media warning (NaN pixels, ...) once per key again.
        # mlfab writes its own values to every logger, and the `self.log` values to its own loggers.
        withhold_from_loggers(self.trainer, self._metric_names, lambda logger: isinstance(logger, MlfabLogger))
        first_counts_batches(self.trainer)
        if self.trainer.loggers and all(isinstance(logger, MlfabLogger) for logger in self.trainer.loggers):
            quiet_log_interval_warning()  # Lightning's advice to lower log_every_n_steps, which they do not read.
        if self.config.compile is not False and self._compiled is None:  # Once, also when fit is followed by test.
            self._compiled = Compiled(self, self.config.compile, self.trainer.strategy.root_device.type)
        if stage == "fit":  # (Again: a task may turn automatic optimization off after the Trainer was built.)
            refuse_under_manual_optimization(self, self.trainer.gradient_clip_val, self.trainer.accumulate_grad_batches)
            # Lightning tells callbacks, not modules, of an exception: this one calls `on_training_end` then. Added
            # here rather than in `configure_callbacks`, which a task may override without calling super.
            last_training_ends_on_error(self.trainer.callbacks)  # type: ignore[attr-defined]
            if not built_by_mlfab(self.trainer) and (unread := unread_settings(self.config)):
                rank_zero_warn(
                    f"{type(self).__name__}'s config sets {', '.join(unread)}, which only a Trainer built by mlfab "
                    "reads (Task.launch, the fit subcommand, mlfab.run.trainer.build_trainer). This Trainer has its "
                    "own settings for them, so here they do nothing: pass them as its arguments, or build it with "
                    "build_trainer(config, exp_dir)."
                    + (" (valid_batches is the number of batches of an endless validation, test or predict set "
                       "in any Trainer; of a finite one, Lightning's limit_*_batches decide.)"
                       if any(u.startswith("valid_batches=") for u in unread) else "")
                )  # fmt: skip
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and (unread := unread_settings(self.config, DATA_KEYS)):
                rank_zero_warn(
                    f"{type(self).__name__}'s config sets {', '.join(unread)}, which mlfab's dataloaders read; this "
                    f"fit takes its data from {type(datamodule).__name__}, whose own dataloaders decide them: unless "
                    "it reads them from the task's config, they do nothing here."
                )
            if (seed := unseeded(self.config)) is not None:
                rank_zero_warn(
                    f"{type(self).__name__}'s config sets seed={seed}, but torch's generator was not seeded with it: "
                    "Task.launch and the subcommands seed torch, numpy and random before building the task. With a "
                    f"Trainer of your own (or build_trainer's), call lightning.pytorch.seed_everything({seed}) first."
                )
            self._weights_from_checkpoint = False
            if self.trainer.global_step == 0:  # A run from step 0 (a resume restores its own counts after this).
                self._start_counts()
            io = self.trainer.strategy.checkpoint_io
            around_saves(io, self.on_before_save_ckpt, self.on_after_save_ckpt, self._synchronous_saves())
        if self._exp_dir is None and type(self).set_loggers is not Task.set_loggers:  # Not mlfab's run: not called.
            rank_zero_warn(
                f"{type(self).__name__} overrides set_loggers, which only a run mlfab starts calls (Task.launch, the "
                "fit / validate / test / predict subcommands), so its loggers are not attached to this Trainer: pass "
                "them as its logger=[...] argument."
            )
        if self.trainer.world_size > 1:
            # Ranks started by torchrun, Slurm or by hand each made their own guess: rank zero's wins.
            self._exp_dir = broadcast_exp_dir(self.trainer, self._exp_dir)
            # Each rank draws its own stream from the global generators (dropout, augmentation in the main process);
            # the weights, initialised alike from the seed, are rank zero's in DDP anyway.
            torch.manual_seed(self.config.seed + self.global_rank)
            np.random.seed((self.config.seed + self.global_rank) % 2**32)
            random.seed(self.config.seed + self.global_rank)

    @override
    def train_dataloader(self) -> DataLoader:
        loader = self._dataloader("train")
        epochly = [type(c.scheduler).__name__ for c in self.trainer.lr_scheduler_configs if c.interval == "epoch"]
        endless = not has_len(loader) and not isinstance(self.trainer.limit_train_batches, int)  # (An int: epochs.)
        if epochly and endless:  # Lightning steps it at an epoch's end, which never comes: silently.
            raise ConfigError(
                f"The learning-rate scheduler {epochly[0]} steps once an epoch (interval 'epoch', Lightning's "
                f"default), and the training set of {type(self).__name__} is endless: it would never step. Return "
                "it as {'scheduler': ..., 'interval': 'step'} in Lightning's dict from build_optimizer or "
                "configure_optimizers (the rate then changes every `frequency` steps; a --lr_scheduler is Lightning's "
                "'epoch' one: build it there instead), or give --trainer.limit_train_batches, a number of batches an "
                "epoch."
            )
        states, self._loader_states = self._loader_states, None
        if states and isinstance(loader, MlfabLoader):  # The next epoch's pass, as the uninterrupted run's.
            loader.load_state_dict(states[0], next_pass=True)
        return loader

    @override
    def val_dataloader(self) -> DataLoader:
        """The "valid" dataset; `valid_batches` batches of it, or what `limit_val_batches` says (of an endless one,
        its 1.0, "all", is `valid_batches`)."""
        return self._limited_dataloader("valid")

    @override
    def test_dataloader(self) -> DataLoader:
        """The "test" dataset; a task whose `get_dataset` does not handle "test" is tested on "valid". A whole
        test set is used, but of an endless one `valid_batches` batches (unless `limit_test_batches` was set)."""
        return self._limited_dataloader("test")

    @override
    @checks_optimizer_reads  # Optimizer keys set that the build does not read are refused.
    def configure_optimizers(self) -> Any:
        built = self.build_optimizer(self) if _takes_model(type(self).build_optimizer) else self.build_optimizer()
        return lightning_optimizers(built, type(self).__name__, self.config.warmup_steps)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._consumed.count += 1  # Counted now: checkpoint callbacks run before this task's batch-end hook.
        accumulates = self._accumulates()  # Not batch_size: a dataset's last batch may be short (as 0.2 counted).
        samples = self._samples(batch, "train" if accumulates else None)
        loss = self._loss_total(self.get_loss(batch, self.state("train")), "train", batch)
        self._num_samples += samples * self.trainer.world_size
        return self._accumulated(loss, max(1, samples)) if accumulates else loss

    def _accumulated(self, loss: Tensor, samples: int) -> Tensor:
        """A batch's loss within a step of k batches, so that the step's update is the gradient of the mean over all
        the step's samples (the loss logged for it), as one batch of them all gives. Lightning divides each batch's
        loss by k: a step of batches of other sizes got the mean of their means, and one short of batches (a finite
        dataset's last) a fraction of its gradient. Each batch's loss is weighted by its samples; at the step's last
        batch, once the step's samples are known, the gradient this process accumulated so far (DDP sums it over
        ranks only in the last batch's backward) is rescaled to them, and the last batch's loss weighted to match."""
        first, total = self._step_samples or (samples, 0)
        total += samples
        if not step_ends(self.trainer):
            self._step_samples = (first, total)
            weight = samples / first
        else:
            self._step_samples = None
            k = self.trainer.accumulate_grad_batches
            if total != k * first:  # Fewer batches than k, or batches of other sizes (rare: only then is it needed).
                for param in self.parameters():
                    if param.grad is not None:
                        param.grad.mul_(k * first / total)
            weight = k * samples / total
        return loss if weight == 1 else loss * weight  # Full steps of equal batches: no extra op on the graph.

    def _evaluation_step(self, phase: Phase, batch: Any) -> Tensor | None:
        if self._loader_of[0] is not None:
            self._refuse_several_loaders(phase)
        self._evaluated[batch is None] += 1
        if batch is None:  # It failed to collate (`mlfab.data.Collate` logged why): skipped, as in training.
            return None
        self._samples(batch, phase)
        loss = self._loss_total(self.get_loss(batch, self.state(phase)), phase, batch)
        if self._compiled is not None and not self._compiled.checked and self.trainer.state.fn != "fit":
            self._compiled.evaluated(self, phase)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._evaluation_step("valid", batch)

    @override
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if task_work_due(self, "on_validation_batch_end"):
            self._batch_done("valid")

    @override
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if task_work_due(self, "on_test_batch_end"):
            self._batch_done("test")

    @override
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if task_work_due(self, "on_predict_batch_end"):
            self._batch_done(PREDICT)

    def _batch_done(self, phase: LogPhase) -> None:
        """After an evaluation batch and its hooks: what is logged before the next batch is moved (and counted), in
        an epoch-end hook say, weighs as one full batch (the largest so far), however the set split."""
        buffer = self._log_buffers[phase]
        buffer.weigh(buffer.largest)
        self._loader_of[1] = None  # Between batches (an epoch-end hook): no loader's, as Lightning names it.

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._evaluation_step("test", batch)

    @override
    def on_test_epoch_end(self) -> None:
        if not task_work_due(self, "on_test_epoch_end"):
            return
        self._say_if_nothing_evaluated("test")
        self._publish_evaluation("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The "predict" dataset, else "test", else "valid" (the first that `get_dataset` does not return None for);
        of an endless one `valid_batches` batches, unless `limit_predict_batches` was set."""
        return self._limited_dataloader("predict")

    def _limited_dataloader(self, phase: str) -> DataLoader:
        loader = self._dataloader(phase)
        limit = f"limit_{phase.removesuffix('id')}_batches"  # limit_val_batches, limit_test_batches, ...
        value = getattr(self.trainer, limit) if self._trainer is not None else None
        if isinstance(value, float) and value == 1.0 and not has_len(loader):  # Lightning's unset (`1`: one batch).
            if not self.config.valid_batches:
                raise ConfigError(
                    f"The {phase} dataset has no end and valid_batches is 0 (validation off), so {phase} would run no "
                    f"batch: set valid_batches, or --trainer.{limit}, to the number of batches to {phase} on."
                )
            setattr(self.trainer, limit, self.config.valid_batches)  # Lightning reads it after this hook.
        return loader

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        if batch is None:  # It failed to collate: None (see _evaluation_step).
            return None
        self._samples(batch, PREDICT)
        prediction = self.get_prediction(batch)
        if self._compiled is not None and not self._compiled.checked:
            self._compiled.evaluated(self, PREDICT)
        return prediction

    @override
    def on_predict_epoch_end(self) -> None:
        """What was logged during predict (in `get_prediction`, ...) is written once, as phase "predict", at the step
        of the weights: scalars as their sample-weighted mean over the whole run (and over ranks), other kinds from its
        first batch, as for validation."""
        if not task_work_due(self, "on_predict_epoch_end"):
            return
        self._flush_logs(PREDICT, self.weights_step)

    @override
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        # Called by Lightning after the step's closure and the `on_before_optimizer_step` hooks, before the update:
        # what sets the rate (a callback, `get_loss`...) has done so.
        refuse_rate_taken_within_warmup(optimizer)
        if not self._rate_logged[0]:  # Once a step: LBFGS runs the closure (and this) several times.
            self._rate_logged[0] = True
            groups = optimizer.param_groups
            self.log_scalar("lr", groups[0]["lr"], namespace="optim")  # The rate this step applies.
            for i in range(1, len(groups)):
                if groups[i]["lr"] != groups[0]["lr"]:  # A group with a rate of its own (a GAN's two networks).
                    self.log_scalar(f"lr_pg{i}", groups[i]["lr"], namespace="optim")
        # fp16 loss scaling skips steps with inf gradients itself; there only the loss is checked.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # 16-mixed, not 16-true.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        by_value = gradient_clip_algorithm not in (None, "norm")  # Lightning's own clipping, after the check.
        norm_clip = None if by_value else gradient_clip_val
        losses = self._step_losses or self._last_losses  # Every batch's of the step, not only the last one's.
        reduce = self.trainer.strategy.reduce if self.trainer.world_size > 1 else None  # One decision for all ranks.
        self._nonfinite.clip_and_check(params, losses, norm_clip, not scaled, reduce)
        if by_value:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        self._rate_logged[0] = False
        try:
            optimizer.step(closure=optimizer_closure)
        except SkipStep:  # Raised before the optimizer changed anything.
            optimizer.zero_grad()
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:  # fp16 loss scaling unscaled this step: end it (backing off on inf gradients).
                scaler.update()
            self._nonfinite.skipped(self.global_step)
        warm_up([optimizer])  # The next step's rate (mlfab.optim.warm_up).
        if self._nonfinite.total:  # On every step from the first skip on, so the next written step shows them.
            self.log_scalar("skipped_steps", self._nonfinite.total, namespace="nonfinite")
            self.log_string("last_skipped_step", self._nonfinite.last_skip, namespace="nonfinite")
        self._nonfinite.check_streak(self.global_step)  # After the logging: the step that stops the run shows it.
        if self._monitored:
            self._publish_monitored()

    def _publish_monitored(self) -> None:
        """The step's values of the training metrics a callback or scheduler monitors, on every rank, averaged over
        ranks by samples (as validation values are), in Lightning's metrics before the callbacks' `on_train_batch_end`
        reads them (this task's runs after those): `ModelCheckpoint(monitor="train/loss/loss",
        every_n_train_steps=N)` scores each checkpoint with its own step's value (it read the last written step's, and
        under DDP waited forever for rank one, which had none)."""
        tags = [tag for tag in self._monitored if tag not in self._lightning_names]  # Not the task's own `self.log`s.
        if not tags:
            return
        means, weights = self._log_buffers["train"].settle(self.global_step - 1, tags)
        means = mean_over_ranks(self.trainer, means, weights, self.device, tags=tags)
        values = {f"train/{tag}": torch.tensor(v, dtype=torch.float64) for tag, v in means.items()}
        publish_metrics(self.trainer, values)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not task_work_due(self, "on_train_batch_start"):
            return
        if not self._step_started:
            self._step_started = True
            if self._rng_at_end is not None:  # Resumed (see on_train_start), and training goes on.
                self._rng_at_end = None
            if type(self).on_step_start is not Task.on_step_start:  # A State costs ~3 us: only when overridden.
                self.on_step_start(self.state("train"))
        if batch_idx + 1 == self.trainer.num_training_batches and isinstance(
            self.trainer.train_dataloader, MlfabLoader
        ):
            self.trainer.train_dataloader.epoch_ends_here()  # (Where `limit_train_batches` ends it before the data.)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not task_work_due(self, "on_train_batch_end"):
            return
        if step_ends(self.trainer):
            self._step_started = False
            if self._step_losses is not None:
                sums, weight, self._step_losses, self._step_weight = self._step_losses, self._step_weight, {}, 0
                if type(self).on_step_end is not Task.on_step_end:  # The step's mean loss, as logged.
                    mean = {k: v / weight for k, v in sums.items()} if weight else {}
                    self.on_step_end(self.state("train"), mean or {k: v.detach() for k, v in self._last_losses.items()})
            if self._training_over:
                self.trainer.should_stop = True
            ends = self._training_ends()
            if ends and not self._due_anyway():  # Before a final validation that a longer run would not make at
                self._rng_at_end = own_rng_state()  # this step (its draws would be the resume's).
            if self._compiled is not None:
                self._compiled.step_ended(self)
            everywhere = self._written_everywhere(ends)
            self._log_bad_data(ask=everywhere)
            self._flush_logs("train", self.global_step - 1, everywhere=everywhere)

    def _synchronous_saves(self) -> str | None:
        """Why checkpoints must be on disk when the save call returns (`async_checkpoints` then writes every one at
        once), if they must."""
        if any(getattr(type(self), h) is not getattr(Task, h) for h in ("on_before_save_ckpt", "on_after_save_ckpt")):
            return (
                f"{type(self).__name__} overrides on_before_save_ckpt / on_after_save_ckpt, which run around the write "
                "of each checkpoint (on_after_save_ckpt once it is on disk)"
            )
        uploading = [type(lg).__name__ for lg in self.trainer.loggers if uploads_checkpoints(lg)]
        return f"{uploading[0]} uploads each checkpoint (log_model) as soon as it is saved" if uploading else None

    def _written_everywhere(self, ends: bool) -> bool:
        """Whether the step that just ended is written to every logger, whatever its cadence: the last step (`ends`:
        `_training_ends`) and a step a validation follows (so that also the last step before EarlyStopping stops,
        and each validation has the training values of its step)."""
        if ends:
            return True
        return self._cadence.validates_now(self.trainer) if self._cadence else lightning_validates_now(self.trainer)

    def _due_anyway(self) -> bool:
        """Whether the step that just ended was to validate whether or not training ends there."""
        return self._cadence.due_now(self.trainer) if self._cadence else lightning_validates_now(self.trainer)

    def _training_ends(self) -> bool:
        """Whether the step that just ended is the last (max_steps, the last batch of max_epochs, or a stop:
        max_time, a signal, a callback)."""
        trainer = self.trainer
        if trainer.should_stop or 0 < trainer.max_steps <= self.global_step:
            return True
        epochs, loop = trainer.max_epochs, trainer.fit_loop.epoch_loop
        return (
            epochs is not None
            and 0 < epochs <= trainer.current_epoch + 1
            and (loop.batch_progress.is_last_batch or loop.batch_idx + 1 >= trainer.num_training_batches)
        )

    def _log_bad_data(self, ask: bool = False, check_every_n_steps: int = 50) -> None:
        """How many samples and batches the data pipeline skipped: once any were, logged lazily on every step. Skipped
        batches are seen the step they happen; bad samples (asking the loader costs a state snapshot) at a session's
        first step, every `check_every_n_steps` steps and where `ask` (a step every logger writes: the last, and one
        a validation follows), so that a short run's last step has them."""
        loader = self.trainer.train_dataloader
        if not isinstance(loader, MlfabLoader):
            return
        dpshdl = isinstance(loader.dataset, DpshdlIterable)
        if not self._bad_data_seen:  # Skipped batches are a plain count; bad samples ask for a state snapshot.
            ask = dpshdl and (ask or not self._bad_data_asked or self.global_step % check_every_n_steps == 1)
            if loader.skipped_batches or (ask and loader.bad_samples()):
                self._bad_data_seen = True  # (Set only when it changes: a Module's attributes are slow to set.)
            if ask:
                self._bad_data_asked = True
        if self._bad_data_seen:
            self.log_scalar("bad_samples", loader.bad_samples if dpshdl else 0, namespace="data")
            self.log_scalar("skipped_batches", lambda: loader.skipped_batches, namespace="data")

    @override
    def on_train_epoch_end(self) -> None:
        """What was logged at the end of an epoch (here or in a callback's hook) is written at its last step."""
        if not task_work_due(self, "on_train_epoch_end"):
            return
        if self._log_buffers["train"]:
            self._flush_logs("train", max(self.global_step - 1, 0), everywhere=True)

    @override
    def on_validation_epoch_end(self) -> None:
        if not task_work_due(self, "on_validation_epoch_end"):
            return
        self._say_if_nothing_evaluated("valid")
        if self.trainer.sanity_checking:  # Like Lightning, nothing from the sanity check is logged.
            self._log_buffers["valid"].clear()
            return
        self._num_valid_steps += 1  # Validations done, as 0.2 counted them (one per validation, whatever its batches).
        self._publish_evaluation("valid")

    def _watch_loaders(self, phase: LogPhase) -> None:
        """At an evaluation's start: whether it has several dataloaders, whose values mlfab must keep apart."""
        loop = {"valid": "val", "test": "test"}.get(phase, "predict")
        counts = getattr(self.trainer, f"num_{loop}_batches")
        self._loader_of[:] = {} if len(counts) > 1 else None, 0, len(counts)

    def _refuse_several_loaders(self, phase: Phase) -> None:
        """mlfab's own step keeps one loss (and one value per name) per evaluation: several loaders would be averaged
        into it, reported as each one's."""
        step = "validation_step" if phase == "valid" else "test_step"
        raise TaskDefinitionError(
            f"The {phase} run has {self._loader_of[2]} dataloaders, and mlfab's {step} would average their batches "
            "into one value per name, reported as each one's. Give one DataLoader (a ConcatDataset of the sets for "
            f"their mean), evaluate each set in a run of its own, or write {step}(self, batch, batch_idx, "
            "dataloader_idx) of your own that logs each loader's values under names of their own."
        )

    def _refuse_tag_of_several_loaders(self, phase: LogPhase, tag: str, key: str) -> None:
        """A name logged with mlfab from two loaders of one evaluation: its values would be averaged into one."""
        tags, loader = self._loader_of[0], self._loader_of[1]
        first = tags.setdefault(tag, loader) if loader is not None else None  # (Not in an epoch-end hook.)
        if first != loader:
            raise TaskDefinitionError(
                f"{tag} was logged from dataloaders {first} and {loader} of the {phase} run: mlfab keeps one value per "
                "name and run, so it would average them into one, reported as each one's. Log each loader's under a "
                f'name of its own (f"{key}_{{dataloader_idx}}"), '
                + ("" if phase == PREDICT else "use Lightning's self.log (which names each loader's value), ")
                + "or give one DataLoader."
            )

    def _say_if_nothing_evaluated(self, phase: Phase) -> None:
        """An evaluation whose every batch failed to collate showed its progress and then no values, without a word."""
        (ran, skipped), self._evaluated = self._evaluated, [0, 0]
        if skipped and not ran:
            rank_zero_warn(
                f"The {phase} run at step {self.weights_step} evaluated none of its batches: all {skipped} failed to "
                "collate (the warnings above say why), so it has no values to write."
            )

    def _publish_evaluation(self, phase: LogPhase) -> None:
        """An evaluation's scalars go into Lightning's metrics at its epoch end, where `self.log` is allowed and
        `on_validation_end` (ModelCheckpoint, EarlyStopping) reads them; it is written once that hook has run, the
        callbacks' and the task's (`_write_evaluation`), so what they log is written with it."""
        buffer = self._log_buffers[phase]
        means, weights = buffer.settle(self.weights_step)  # Held resolved: the write runs no callable again.
        self._evaluation = (weights, self._publish(phase, means, weights))
        if phase == "valid" and self.trainer.state.fn == "fit":  # An error in on_validation_end: written as it ends.
            self._valid_unwritten = functools.partial(self._write_evaluation, "valid", failed=True)

    def _write_evaluation(self, phase: LogPhase, failed: bool = False) -> None:
        """Writes the evaluation at its step, with what was logged after `_publish_evaluation` (in `on_validation_end`
        / `on_test_end`); those scalars also reach Lightning's metrics, averaged over ranks as the evaluation's others
        (`failed`: training failed; this rank's, where the others may be gone)."""
        buffer = self._log_buffers[phase]
        pending, self._evaluation = self._evaluation, None
        if self.trainer.sanity_checking:  # (Callbacks' on_validation_end runs in the sanity check too.)
            buffer.clear()
            return
        if pending is None and not buffer:  # Written already.
            return
        counts, published = pending or ({}, {})
        trainer = self.trainer

        def publish(phase: LogPhase, means: dict[str, float], weights: dict[str, Any]) -> dict[str, float]:
            changed = [tag for tag in means if weights[tag] != counts.get(tag)]  # New, or averaged with new values.
            if trainer.world_size > 1 and not failed:  # Each rank's whole mean of a tag any rank has new values of.
                (tags,) = union_over_ranks(trainer, changed)
                late = mean_over_ranks(trainer, means, weights, self.device, tags=tags)
            else:
                late = {tag: means[tag] for tag in changed}
            if late and not trainer.barebones:
                names = {f"{phase}/{tag}": tag for tag in late if tag not in self._lightning_names}
                publish_metrics(trainer, {n: torch.tensor(late[tag], dtype=torch.float64) for n, tag in names.items()})
            return published | late

        fitting = phase == "valid" and trainer.state.fn == "fit"
        everywhere = failed or (fitting and self._training_ends())
        unwritten = self._flush_logs(phase, self.weights_step, everywhere=everywhere, publish=publish)
        if phase == "valid" and not failed:
            self._valid_unwritten = unwritten if fitting else None

    @override
    def on_train_start(self) -> None:
        if not task_work_due(self, "on_train_start"):
            return
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        self._cadence = next((c for c in callbacks if isinstance(c, ValidationCadence)), None)  # Once, not every step.
        self._monitored = monitored_training_tags(self.trainer)
        self._step_samples, self._rng_at_end = None, None  # (A fit that failed mid-step left its own.)
        set_optimizer_mode(self.trainer.optimizers, train=True)
        if self._resume_changes:  # After Lightning restored the optimizer state, which holds the old values.
            apply_optimizer_changes(self.trainer.optimizers, self._resume_changes)
            if self.trainer.is_global_zero:
                print(f"Resumed with changed settings: {describe(self._resume_changes)}", flush=True)
            self.log_string("changed_settings", describe(self._resume_changes), namespace="resume")
            self._resume_changes = {}
        warm_up(self.trainer.optimizers)
        if self.trainer.ckpt_path is not None and self.trainer.is_global_zero:  # Resumed: steps past it come again.
            validated = self._cadence is None or not self._cadence.owed
            steps: dict[LogPhase, int] = {"train": self.global_step, "valid": self.global_step + validated}
            for logger in self.trainer.loggers:
                if isinstance(logger, MlfabLogger):
                    logger.resumed(steps)
            plateau = [c for c in self.trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == "step"]
            if plateau and not validated:  # Lightning's, after the validation the resume runs first.
                print(
                    f"This run resumes at step {self.global_step}, which was to validate: after that validation "
                    f"Lightning steps {type(plateau[0].scheduler).__name__} once more than the uninterrupted run did, "
                    "so the rate may differ from here on. Resume from a checkpoint of another step to avoid it.",
                    file=sys.stderr,
                    flush=True,
                )
        if self._pending_rng is not None:
            restore_rng_states(self.trainer, self._pending_rng)
            self._pending_rng, self._rng_at_end = None, own_rng_state()  # Where training ended, until it goes on.
        self._training_over = self._step_started = False
        wanted = type(self).on_step_end is not Task.on_step_end or may_accumulate(self.trainer)
        self._step_losses, self._step_weight = ({} if wanted else None), 0
        self.on_training_start(self.state("train"))
        if self._training_over:  # Called there: no step at all (0.2 asked before each step, the first one too).
            self.trainer.should_stop = True

    @override
    def on_train_end(self) -> None:
        if not task_work_due(self, "on_train_end"):
            return
        self._end_training()  # The task holds the evaluation weights already (`CountsBatches.on_train_end`).

    def _end_training(self, failed: bool = False) -> None:
        """`on_training_end`, then what was logged since the last written step (in that hook, or in the step an
        error ended) written at that step, and the last validation where a write interval skipped it, every
        logger's cadence aside."""
        self.on_training_end(self.state("train"))
        step = self.global_step if self._step_started else self.global_step - 1  # The step in progress, or the last.
        unwritten, self._valid_unwritten = self._valid_unwritten, None
        try:
            if self._log_buffers["train"]:
                self._flush_logs("train", max(step, 0), everywhere=True)
            if unwritten is not None:  # The last validation, skipped by a write interval (EarlyStopping ended on it).
                unwritten()
        except Exception as e:
            if not failed:
                raise
            rank_zero_warn(f"The values logged as training failed could not be written: {e!r}")

    def _evaluation_weights(self, evaluate: bool) -> None:
        """Schedule-free optimizers: evaluate with their evaluation weights, then, within `fit`, go back to the
        training weights (after `fit` the task holds the evaluation weights: `on_train_end`). Not after `validate` /
        `test` loaded a checkpoint, which holds evaluation weights already (saved in eval mode) and does not restore
        the optimizer: switching would transform them a second time."""
        if not self._weights_from_checkpoint and (evaluate or self.trainer.state.fn == "fit"):
            set_optimizer_mode(self.trainer.optimizers, train=not evaluate)

    @override
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self._watch_loaders("valid")
        self._evaluation_weights(True)

    @override
    def on_validation_model_train(self) -> None:
        self._write_evaluation("valid")  # After on_validation_end; lazy values still see the evaluation's model.
        super().on_validation_model_train()
        self._evaluation_weights(False)

    @override
    def on_test_model_eval(self) -> None:
        super().on_test_model_eval()
        self._watch_loaders("test")
        self._evaluation_weights(True)

    @override
    def on_test_model_train(self) -> None:
        self._write_evaluation("test")  # After on_test_end; lazy values still see the evaluation's model.
        super().on_test_model_train()
        self._evaluation_weights(False)

    @override
    def on_predict_model_eval(self) -> None:
        super().on_predict_model_eval()
        self._watch_loaders(PREDICT)
        self._evaluation_weights(True)

    @override
    def on_predict_end(self) -> None:  # Lightning has no `on_predict_model_train`: its loop restores the mode itself.
        if not task_work_due(self, "on_predict_end"):
            return
        self._evaluation_weights(False)

    def _start_counts(self) -> None:
        """The run's counts and clocks at step 0: also where a task whose weights came from a checkpoint
        (`load_from_checkpoint`, an earlier `validate`) starts a new fit, which would otherwise count on from the
        file's samples and time."""
        self._num_samples = 0
        self._num_valid_steps = 0
        self._start_time_s = time.time()
        self._elapsed_before_s = 0.0  # Time spent in earlier sessions of this run (restored on resume).
        self._session_start_s = time.monotonic()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not task_work_due(self, "on_save_checkpoint"):
            return
        checkpoint["mlfab"] = {
            "task": task_id(type(self)),
            "num_samples": self._num_samples,
            "num_valid_steps": self._num_valid_steps,
            "start_time_s": self._start_time_s,
            "elapsed_time_s": self.elapsed_time_s,
            # Every rank's, so each resumes its own stream; as it was where training ended, for `last.ckpt`.
            "rng": gather_rng_states(self.trainer, self._rng_at_end),
            "nonfinite": self._nonfinite.state_dict(),
            "optimizer_args": self._optimizer_args,
            "saved_at": time.time(),  # Orders the run's checkpoints where file times were lost (a copied run).
            "task_state": self.task_state_dict(),
        }
        save_in_eval_mode(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not task_work_due(self, "on_load_checkpoint"):
            return
        # Lightning calls this before it loads the weights, so a checkpoint of another task or config is refused
        # with an explanation instead of a key or shape error.
        check_compatible(checkpoint, Path(str(self._trainer and self.trainer.ckpt_path or "the checkpoint")), self)
        saved = checkpoint.get("mlfab", {})
        self._num_samples = int(saved.get("num_samples", 0))
        self._num_valid_steps = int(saved.get("num_valid_steps", 0))
        self._start_time_s = float(saved.get("start_time_s", self._start_time_s))
        self._elapsed_before_s = float(saved.get("elapsed_time_s", 0.0))
        if "task_state" in saved:
            self.load_task_state_dict_(saved["task_state"])
        self._session_start_s = time.monotonic()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._check_resume(checkpoint)
            self._nonfinite.load_state_dict(saved.get("nonfinite", {}))
            use_training_weights(checkpoint)
            # Restored when training starts: Lightning builds the dataloaders in between, and `get_dataset` or a
            # dataset may draw from the global generators there, as the uninterrupted run did before step 0.
            self._pending_rng = saved.get("rng")
            # For `train_dataloader`, where Lightning would not restore them as they are.
            self._loader_states = next_epoch_from_here(checkpoint, MlfabLoader.pass_ended)
        else:  # The file's evaluation weights, for `validate` / `test` / `predict` (or `load_from_checkpoint`).
            self._weights_from_checkpoint = True
            self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def _check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Refuses config changes a resumed run cannot apply (mlfab/resume.py); keeps the others for on_train_start."""
        path = self.trainer.ckpt_path
        saved_ranks = len(checkpoint.get("mlfab", {}).get("rng") or [None])
        if saved_ranks != self.trainer.world_size:
            raise ConfigError(
                f"Cannot resume from {path}: it was written by {saved_ranks} process(es) and this run has "
                f"{self.trainer.world_size}; each rank's data stream and random state were saved. Relaunch with the "
                "devices and num_nodes the run was started with, or start a new run."
            )
        step, max_steps = int(checkpoint.get("global_step", 0)), self.trainer.max_steps
        if 0 <= max_steps < step:  # Lightning would end at once, and config.yaml record a max_steps the run is past.
            raise ConfigError(
                f"max_steps={max_steps} is below step {step}, which {path} is at: there is nothing to train. Set "
                f"max_steps={step} or more to go on from there, or give a new exp_dir to train from the start."
            )
        changes = config_changes(checkpoint.get("hyper_parameters", {}).get("config", {}), to_dict(self.config))
        hooks = ("get_optimizer_builder", "build_optimizer", "configure_optimizers")
        own = any(getattr(type(self), h) is not getattr(Task, h) for h in hooks) or "configure_optimizers" in vars(self)
        saved, now = checkpoint.get("mlfab", {}).get("optimizer_args"), self._optimizer_args
        changes_of_args = {} if saved is None or now is None else config_changes(saved, now, every_key=True)
        check_changes(changes, own, type(self).__name__, path, changes_of_args)
        self._resume_changes = changes

    # ----------------------------------------------------------------------------------------------------------------
    # Running.

    @restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, with the checkpoint checked first as a resume checks it (its `.sha256`, or a complete file):
        a damaged file loaded silently, with wrong weights."""
        if isinstance(checkpoint_path, str | PurePath) and Path(checkpoint_path).expanduser().is_file():
            path = Path(checkpoint_path).expanduser()
            if (problem := damage(path)) is not None:
                raise CheckpointError(f"Checkpoint {path} is corrupt or truncated: {problem}. Load another one.")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @classmethod
    def launch(
        cls, *configs: Any, launcher: Any = None, argv: list[str] | None = None, use_cli: bool | list[str] = True
    ) -> None:
        """Resolves the config (defaults <- `configs` <- YAML files and key=value on the command line) and trains.
        `argv`: the arguments instead of the command line; mlfab 0.2's `use_cli=False` (no arguments) or
        `use_cli=[...]` (these arguments) also work. Inside the Slurm job `launcher="slurm"` submitted, the job's run
        directory is added to these arguments (the job's command line holds it, for a launch that reads that), so the
        job, and each requeue of it, trains in the run directory it was submitted for."""
        if use_cli is not True:
            if argv is not None:
                raise TaskDefinitionError(f"{cls.__name__}.launch: give argv or use_cli, not both.")
            argv = [] if use_cli is False else list(use_cli)
        launch(cls, *configs, launcher=launcher, argv=None if argv is None else job_arguments(list(argv), launcher))


def per_sample_reduced(loss: Any, batch_samples: Callable[[], int], task: str) -> Any:
    """A loss with a batch dimension (per-sample losses, in a Tensor or as values of a dict), reduced as mlfab 0.2
    did: its sum divided by the batch size (for a (B,) loss, the mean over samples). Scalars are kept; a tensor whose
    first dimension is not the batch's number of samples is refused rather than averaged into a wrong number."""
    if isinstance(loss, Mapping):
        return {k: _reduced(v, k, batch_samples, task) for k, v in loss.items()}
    return _reduced(loss, "loss", batch_samples, task)


def _reduced(value: Any, name: str, batch_samples: Callable[[], int], task: str) -> Any:
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    n = batch_samples()
    if value.shape[0] != n:
        raise TaskDefinitionError(
            f"{task}.get_loss returned a tensor of shape {tuple(value.shape)} for loss {name!r}; each loss must be a "
            f"scalar, or one value per sample (a first dimension of {n}, this batch's size: get_num_samples), which "
            "is summed and divided by the batch size."
        )
    return value.sum() / n


def _takes_model(build_optimizer: Callable[..., Any]) -> bool:
    """Whether an overridden `build_optimizer` has mlfab 0.2's signature `(self, model)`."""
    params = list(inspect.signature(build_optimizer).parameters.values())[1:]
    return bool(params) and params[0].default is inspect.Parameter.empty


def _leading_dims(batch: Any) -> Iterator[int]:
    """The leading dimension of each tensor or array in a batch (1 for a 0-d one), depth first through tuples, lists,
    dicts and dataclasses (their fields that `__init__` takes, in order: those `mlfab.data.to_torch` converts)."""
    if isinstance(batch, Tensor | np.ndarray):
        yield int(batch.shape[0]) if batch.ndim else 1
    elif isinstance(batch, Mapping | list | tuple):
        for item in batch.values() if isinstance(batch, Mapping) else batch:
            yield from _leading_dims(item)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            if field.init:
                yield from _leading_dims(getattr(batch, field.name))


precompute_step_signatures(Task)  # Lightning inspects the step hooks' signatures on every batch.
