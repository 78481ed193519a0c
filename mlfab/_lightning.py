"""Every use of a private name of Lightning (and torch), and every speed trick that leans on how Lightning calls
us, in one place: a Lightning upgrade is checked here and in tests/test_lightning_private.py.

Imports nothing from mlfab, so every other module may import it.
"""

import functools
import inspect
import time
from collections.abc import Callable, Container
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.evaluation_loop import RestartStage as EvaluationRestartStage
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import Tensor
from torch._dynamo.callback import on_compile_end, on_compile_start
from typing_extensions import override

# ---------------------------------------------------------------------------------------------------------------------
# The training loop's decisions.


def step_ends(trainer: pl.Trainer) -> bool:
    """Whether the current batch ends an optimizer step, as Lightning decides it: after `accumulate_grad_batches`
    batches and also at an epoch's last batch.

    Private: `_TrainingEpochLoop._should_accumulate()`, the very test Lightning uses to decide whether to step the
    optimizer, so mlfab's notion of a step can never drift from Lightning's."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


ValidationDecision = Callable[[Any], bool]


def wrap_validation_decision(
    trainer: pl.Trainer, decide: Callable[[ValidationDecision, Any], bool]
) -> ValidationDecision:
    """Makes `decide(lightning_decision, data_fetcher)` the training loop's "validate after this batch?".

    Private: `_TrainingEpochLoop._should_check_val_fx(data_fetcher)`, which Lightning calls after every training
    batch; it is replaced on the loop instance (not the class), so only this trainer is affected. `decide` gets
    Lightning's own decision, to call (or not) itself; it is also returned."""
    loop = trainer.fit_loop.epoch_loop
    lightning_decision = loop._should_check_val_fx
    loop._should_check_val_fx = functools.partial(decide, lightning_decision)  # type: ignore[method-assign]
    return lightning_decision


def lightning_validates_now(trainer: pl.Trainer) -> bool:
    """Lightning's own answer to "validate after the batch that just ended?" (`val_check_interval`,
    `check_val_every_n_epoch`, a stop), for a Trainer mlfab did not build. Private: the training loop's
    `_should_check_val_fx` (see `wrap_validation_decision`)."""
    loop = trainer.fit_loop.epoch_loop
    return trainer.enable_validation and bool(loop._should_check_val_fx(lightning_data_fetcher(trainer)))


def strategy_name(strategy: Any) -> str:
    """A strategy as Lightning's registry names it (`ddp`, `ddp_spawn`, `ddp_fork`, `fsdp`, ...). Private:
    `DDPStrategy._start_method`, the one difference between ddp, ddp_spawn and ddp_fork (a single class)."""
    name = type(strategy).__name__.removesuffix("Strategy").lower()
    method = getattr(strategy, "_start_method", "popen")
    return name if method == "popen" else f"{name}_{method}"


def lightning_data_fetcher(trainer: pl.Trainer) -> Any:
    """The fit loop's data fetcher, which Lightning's validation decision takes. Private: `_FitLoop._data_fetcher`."""
    return trainer.fit_loop._data_fetcher


def validate_before_next_batch(trainer: pl.Trainer) -> None:
    """Makes a resumed fit run the validation its checkpoint was taken before, ahead of the next training batch.

    Private: the evaluation loop's restart stage. With `RESTARTED_MID_EVALUATION`, `_TrainingEpochLoop.advance`
    returns before it fetches a batch whenever the validation decision says yes, and `on_advance_end` then runs the
    validation loop (Lightning's path for a checkpoint written during a validation); without it, a resumed loop
    fast-forwards past that validation."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop._restart_stage = EvaluationRestartStage.RESTARTED_MID_EVALUATION
    val_loop.batch_progress.reset_on_run()  # None of its batches ran: it starts from the first.


# ---------------------------------------------------------------------------------------------------------------------
# Lightning's metrics (`trainer.callback_metrics`, `logged_metrics`, what `validate` / `test` return).


def withhold_from_loggers(trainer: pl.Trainer, names: Container[str], writes_itself: Callable[[Any], bool]) -> None:
    """Makes Lightning pass no metric named in `names` to the trainer's loggers, and nothing at all to the loggers
    for which `writes_itself(logger)` is true, while it keeps every metric in `trainer.callback_metrics`,
    `logged_metrics` and the results of `validate` / `test`. mlfab writes its values to every logger itself (with
    their phase and step) and `self.log`s them only so that they reach those; its own loggers also get the task's
    Lightning `self.log` values from mlfab. `names` is read at each call, so it may grow afterwards.

    Private: `_LoggerConnector.log_metrics(metrics, step)`, through which Lightning hands every `self.log` value to
    `logger.log_metrics` (after an evaluation, and at training steps), looping over `trainer.loggers`; it is replaced
    on this trainer's connector instance (not the class), wrapping the class's own, so installing it again replaces
    it. Callbacks that call `logger.log_metrics` themselves (LearningRateMonitor) still reach every logger."""
    connector = trainer._logger_connector
    original = type(connector).log_metrics.__get__(connector)

    def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
        loggers = trainer.loggers
        trainer.loggers = [lg for lg in loggers if not writes_itself(lg)]
        try:
            original({k: v for k, v in metrics.items() if k not in names}, step)
        finally:
            trainer.loggers = loggers

    connector.log_metrics = log_metrics  # type: ignore[method-assign]


def metric_step_value(metric: Any) -> Tensor | None:
    """A torchmetrics Metric's value for the last batch it was called on (what Lightning logs for a Metric on step),
    or None when it was only `update`d. Private: torchmetrics' `Metric._forward_cache`, which Lightning reads too."""
    value = getattr(metric, "_forward_cache", None)
    return value.detach().clone() if isinstance(value, Tensor) else None


def publish_metrics(trainer: pl.Trainer, metrics: dict[str, Tensor]) -> None:
    """Puts values into `trainer.callback_metrics` and `trainer.logged_metrics` without `self.log`, for training
    values mlfab resolves only at the steps it writes: `self.log` costs about 0.5 ms per call, and an on-step
    `self.log` value stays in Lightning's result collection, which is then read at every later step of the epoch.
    They stay until Lightning resets its metrics (at the start of each `fit`, `validate`, ...) or mlfab publishes
    newer ones.

    Leans on: both properties returning the logger connector's own dicts, which Lightning updates in place and
    callbacks read (EarlyStopping, ModelCheckpoint)."""
    trainer.callback_metrics.update(metrics)
    trainer.logged_metrics.update(metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks: Lightning's dispatch of callback hooks (`lightning/pytorch/trainer/call.py`).

# The hooks Lightning calls on every callback at every training (or validation) step.
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
)


class StepFreeCallback(Callback):
    """A callback that costs nothing at the steps where it does nothing.

    Lightning calls every per-step hook of every callback, no-op or not (~2 us each); it skips a hook that is
    not callable (`_call_callback_hooks` in `trainer/call.py` checks `callable(fn)`), so the per-step hooks a
    subclass does not override are set to None. For mlfab's own callbacks only: a subclass calling `super()` in
    such a hook, or a class listing another callback after this one in its bases, would find None there.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in PER_STEP_HOOKS:
            if getattr(cls, hook) is getattr(Callback, hook):
                setattr(cls, hook, None)


class CachedStateKey(Callback):
    """A callback whose `state_key` is made once. Lightning formats `f"[Callback]{callback.state_key}.{hook}"` for
    every hook it dispatches (`_call_callback_hooks`), and e.g. ModelCheckpoint's key is a repr of its settings;
    this caches the first one. Only for callbacks whose key-making settings do not change after construction."""

    @functools.cached_property
    @override
    def state_key(self) -> str:
        return super().state_key


class NoProfiler(PassThroughProfiler):
    """Lightning's default when no profiler is asked for, without the cost: its `profile()` builds a generator-based
    context manager around each of the ~25 hook calls of a step (~1 us each), this one returns the same empty one.
    (At module level so that the Trainer pickles, as `strategy="ddp_spawn"` needs.)

    Leans on: Lightning only ever using `profiler.profile(name)` as a `with` context around hook calls."""

    _nothing = nullcontext()

    @override
    def profile(self, action_name: str) -> Any:
        return self._nothing


def no_profiler() -> NoProfiler:
    return NoProfiler()


# ---------------------------------------------------------------------------------------------------------------------
# The LightningModule: what Lightning does around every hook call.


class FastFxName:
    """Mixin for a LightningModule (listed before it in the bases) that sets `_current_fx_name` cheaply.

    Lightning sets `_current_fx_name` twice around each of the ~20 hook calls of a step (`trainer/call.py`);
    nn.Module's __setattr__ (its parameter, buffer and submodule checks) made that ~8% of a small model's step
    time. The name is never a parameter, buffer or module, so it is set as a plain attribute."""

    # Also what mlfab's Task sets on every step: a flag, a count and a dict of loss tensors (never a module's state).
    _plain_attributes = frozenset({"_current_fx_name", "_step_started", "_num_samples", "_last_losses"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._plain_attributes:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


STEP_HOOKS = ("training_step", "validation_step", "test_step")


def precompute_step_signatures(cls: type) -> None:
    """Lightning reads a step hook's signature on every batch (`is_param_in_hook_signature`: does it take
    `batch_idx`?) with `inspect.getfullargspec`; given a `__signature__`, inspect returns that instead of parsing
    the function again. Call it once per class that defines the hooks (a subclass overriding one has its own)."""
    for name in STEP_HOOKS:
        hook = getattr(cls, name)
        hook.__signature__ = inspect.signature(hook)


# ---------------------------------------------------------------------------------------------------------------------
# Private names of torch and Lightning used outside the training loop.


def file_writer(summary_writer: Any) -> Any:
    """The event-file writer of a torch SummaryWriter, for a summary protobuf that SummaryWriter has no `add_*`
    for (a GIF as an image summary). Private: `SummaryWriter._get_file_writer()` (`.add_summary(summary, step)`)."""
    return summary_writer._get_file_writer()


def uploads_checkpoints(logger: Any) -> bool:
    """Whether a Lightning logger uploads checkpoint files right after they are saved (WandbLogger, MLFlowLogger, ...
    with `log_model`). Private: the loggers' `_log_model`, which their `after_save_checkpoint` reads."""
    return bool(getattr(logger, "_log_model", False))


def metric_prefix(logger: Any) -> str:
    """What a Lightning logger puts before each metric name it is given (its `prefix=`, then its join character:
    `"exp1-"`), or "" without one; mlfab writes its values to Lightning's TensorBoard and W&B loggers past their
    `log_metrics`, so it applies the prefix itself, as they do to `self.log` values. Private: the loggers' `_prefix`,
    which their `log_metrics` adds with `LOGGER_JOIN_CHAR` (`lightning.fabric.utilities.logger._add_prefix`)."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""


def collect_rng_states(include_cuda: bool) -> dict[str, Any]:
    """The global random states of torch (and CUDA), numpy and Python: `{"torch", "python", "numpy"[,
    "torch.cuda"]}`. Private: `lightning.fabric.utilities.seed._collect_rng_states`, the very function Lightning's
    own checkpoints use, so the format matches `set_rng_states`."""
    return _collect_rng_states(include_cuda=include_cuda)


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what `collect_rng_states` returned. Private: `lightning.fabric.utilities.seed._set_rng_states`."""
    _set_rng_states(states)


# A classmethod that refuses to be called on an instance, as Lightning's `LightningModule.load_from_checkpoint` is (it
# returns a new module, which users called on an instance expecting it to load in place): mlfab's override keeps that.
# Private: `lightning.pytorch.utilities.model_helpers._restricted_classmethod`.
restricted_classmethod = _restricted_classmethod


UNITERATED = "Please call `iter(combined_loader)` first."


def hidden_by_teardown(error: BaseException) -> BaseException | None:
    """The error Lightning's teardown hid, if it did: where the training loader failed as its iterator was made (a
    dataset whose `__iter__` raises), the fit loop's teardown asks the loader's length and raises a RuntimeError of its
    own, with the user's error only as its context. Private: that message, `CombinedLoader.__len__`'s."""
    if isinstance(error, RuntimeError) and str(error) == UNITERATED and error.__context__ is not None:
        return error.__context__
    return None


def next_epoch_from_here(checkpoint: dict[str, Any], pass_ended: Callable[[Any], bool]) -> list[Any] | None:
    """For a checkpoint written once its epoch had finished (training ended with an epoch's last batch: `max_steps`, a
    signal, `max_epochs`; `pass_ended(loader state)` says where an epoch limit, not the data, ended it): the training
    loaders' states, which mlfab restores itself as of the next epoch's pass, taken out of the checkpoint, whose
    epoch loop is set to start that epoch; None for any other checkpoint, which Lightning restores as it is.
    Lightning resumes such a checkpoint into a loop that runs the finished epoch once more, empty, and counts it
    (`current_epoch` one ahead: `max_epochs` then ends the run an epoch early), or, training by epochs, restores no
    loader state at all (the next epoch drew the first one's order). (A fit that `max_steps` stopped mid-epoch counts
    that epoch as finished too: its loop state alone cannot tell.) Private: the layout of Lightning's loop state in
    its checkpoints (`loops.fit_loop`: `epoch_progress`, `epoch_loop.batch_progress`, `state_dict.combined_loader`)."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress", {}).get("total", {}), fit.get("epoch_loop.batch_progress", {})
    counts = [epochs.get(k) for k in ("ready", "started", "processed", "completed")]
    states = fit.get("state_dict", {}).get("combined_loader") or []
    if not (counts[0] and len(set(counts)) == 1 and batches.get("current", {}).get("ready")):
        return None
    if not (batches.get("is_last_batch") or (len(states) == 1 and pass_ended(states[0]))):
        return None
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    fit["state_dict"]["combined_loader"] = []
    return states


def unrepeated_sampler(dataset: Any, num_replicas: int, rank: int) -> UnrepeatedDistributedSampler:
    """Rank `rank`'s share of a map-style dataset in order (`rank`, `rank + num_replicas`, ...), no sample repeated.
    Lightning's own for `predict`, from `lightning.pytorch.overrides` (undocumented): a DistributedSampler, so
    Lightning keeps it instead of injecting its padded one (`_DataConnector._requires_distributed_sampler`)."""
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def foreach_norm(tensors: list[Tensor]) -> tuple[Tensor, ...]:
    """Each tensor's 2-norm, in one fused call (one kernel per device and dtype instead of one per tensor).
    Private: `torch._foreach_norm`, which `torch.nn.utils.clip_grad_norm_` itself uses."""
    return torch._foreach_norm(tensors)


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile's cost.

_compile_seconds = [0.0]
_compile_started: dict[tuple[Any, str], float] = {}


@functools.cache
def _count_compile_time() -> None:
    """Registers (once per process) torch's compile-start and -end callbacks, which Dynamo calls around each graph
    it compiles, Inductor's code generation and the backward compiled lazily at the first backward included.
    Private: `torch._dynamo.callback.on_compile_start` / `on_compile_end` (torch has no public compile timer)."""

    def start(args: Any) -> None:
        _compile_started[(args.callback_trigger, args.compile_id)] = time.perf_counter()

    def end(args: Any) -> None:
        started = _compile_started.pop((args.callback_trigger, args.compile_id), None)
        if started is not None:
            _compile_seconds[0] += time.perf_counter() - started

    on_compile_start(start)
    on_compile_end(end)


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile, counted from the first call of this function
    (call it before compiling)."""
    _count_compile_time()
    return _compile_seconds[0]


# ---------------------------------------------------------------------------------------------------------------------
# Spawn-based strategies: what rank zero sends back to the launching process.


class SpawnedResult:
    """A value `collect(trainer)` computes in rank zero under a spawn-based strategy (`ddp_spawn`, `ddp_fork`,
    `ddp_notebook`), brought back to the launching process as `result`; None under any other launcher (the launching
    process did the work itself). There Lightning runs the work in processes it starts, on copies of the Trainer,
    task and callbacks, and its launcher sends rank zero's weights, best checkpoint path and `callback_metrics` back.

    Leans on: the launcher (`_MultiProcessingLauncher`) calling its own `get_extra_results(trainer)` in rank zero and
    `update_main_process_results(trainer, extra)` in the launching process, its way for subclasses to send more; both
    are replaced on this Trainer's launcher instance by bound methods of this object (picklable, with a module-level
    `collect`), which call the class's own first."""

    KEY = "mlfab_result"

    def __init__(self, collect: Callable[[pl.Trainer], Any]) -> None:
        self.collect = collect
        self.result: Any = None
        self.spawns = False

    def install(self, trainer: pl.Trainer) -> "SpawnedResult":
        launcher = trainer.strategy.launcher
        self.spawns = hasattr(launcher, "get_extra_results") and hasattr(launcher, "update_main_process_results")
        if self.spawns:  # The work runs in processes the launcher starts.
            launcher.get_extra_results = self.get_extra_results  # type: ignore[union-attr]
            launcher.update_main_process_results = self.update_main_process_results  # type: ignore[union-attr]
        return self

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        launcher: Any = trainer.strategy.launcher
        return {**type(launcher).get_extra_results(launcher, trainer), self.KEY: self.collect(trainer)}

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        launcher: Any = trainer.strategy.launcher
        type(launcher).update_main_process_results(launcher, trainer, extra)
        self.result = extra.get(self.KEY)
