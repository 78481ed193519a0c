"""How a Task subclass declares its config: `class MyTask(mlfab.Task[MyConfig])`.

The config class is read from the generic argument. Each subclass's `__init__` is wrapped so a plain mapping
(hyperparameters read back from a checkpoint) arrives as the typed config; a subclass without an `__init__`
of its own gets one whose annotation names its config, because jsonargparse reads that annotation (an
`__init__(self, config)` without one, or naming a base class of the config, gets it filled in).
"""

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from mlfab.config import build_config
from mlfab.errors import TaskDefinitionError

# Methods of mlfab 0.2's Task that a task author overrode and that nothing here calls (its own training loop is
# Lightning's now): defining one is refused when the class is created, naming what to use instead, rather than the
# override being silently ignored.
REPLACED_0_2_METHODS = {
    "train_step": "Lightning's `training_step(batch, batch_idx)` (call `super().training_step(...)`)",
    "val_step": "Lightning's `validation_step(batch, batch_idx)` (call `super().validation_step(...)`)",
    "get_dataloader": "Lightning's `train_dataloader()` / `val_dataloader()`, or a dataset's own `collate`",
    "get_size_of_batch": "`get_num_samples(batch)`",
    "get_single_loss": "`get_loss` returning a scalar or a dict of them (per-sample losses are reduced as in 0.2)",
    "on_before_forward_step": "`on_step_start(state)` or Lightning's `on_train_batch_start(batch, batch_idx)`",
    "on_after_forward_step": "Lightning's `on_train_batch_end(outputs, batch, batch_idx)` (call super)",
    "on_after_compute_loss": "Lightning's `on_before_backward(loss)`",
    "is_valid_step": "the config keys `valid_every_n_steps` / `valid_every_n_seconds`",
    "should_save_ckpt": "the config keys `save_every_n_steps` / `save_every_n_seconds`",
    "is_training_over": "`set_training_over()`, `max_steps`, or `--trainer.max_time`",
    "get_remaining_percent": "`max_steps` (`time/remaining_s` is logged)",
    "step_optimizer": "Lightning's `optimizer_step` hook (call super)",
    "zero_optimizer": "Lightning's `optimizer_zero_grad` hook",
    "backward_grads": "Lightning's `backward` hook",
    "get_trainable_module": "Lightning's strategies (`strategy`, `devices`)",
    "configure_model_": "Lightning's `configure_model()` hook",
    "should_wrap": "Lightning's strategies (`strategy`)",
    "compile_model": "the config key `compile` (`true` or a mapping of torch.compile options)",
    "get_compiler_backend": "the config key `compile` with a `backend` (`compile='{backend: inductor}'`)",
    "data_worker_init_fn": "a dataset's `worker_init(worker_id, num_workers)` (dpshdl)",
    "collate_worker_init_fn": "a dataset's `worker_init(worker_id, num_workers)` (dpshdl)",
    "get_init_ckpt_path": "`--ckpt_path` (resume) or `Task.load_from_checkpoint`",
    "get_profile": "`--trainer.profiler`",
    "on_profiler_trace_ready": "`--trainer.profiler` (Lightning's PyTorchProfiler)",
    "load_ckpt_": "`--ckpt_path` (resume), `Task.load_from_checkpoint` or Lightning's `on_load_checkpoint` hook",
    "save_ckpt": "the config keys `save_every_n_steps` / `save_every_n_seconds` (files in <exp_dir>/checkpoints), "
    "`on_before_save_ckpt` / `on_after_save_ckpt`, or Lightning's `on_save_checkpoint(checkpoint)`",
    "get_ckpt_path": "`--ckpt_path` to resume from a checkpoint (they are written to <exp_dir>/checkpoints)",
    "get_wrapped_model": "the config key `strategy` (Lightning's DDP or FSDP wraps the model)",
    "write_logs": "a logger of your own (subclass `mlfab.PlainLogger`, implement `write(logs)`)",
    "log_loss_dict": "`get_loss` returning a dict (each part is logged as `loss/<name>`), or `log_scalar`",
    "batches_per_step_schedule": "the config key `batches_per_step`, or Lightning's `GradientAccumulationScheduler`",
    "get_device_manager": "the config keys `accelerator` / `devices` / `precision`",
    "stage_environment": "the run directory's `provenance/`, which mlfab writes (git commit, branch and diff)",
    "run": "`Task.launch` (or a Lightning Trainer's `fit`) trains; work other than training goes in a script of yours",
    "log_state": "`on_training_start(state)`, which runs once training starts (the config is in config.yaml)",
    "step_context": "`--trainer.profiler` (Lightning's profilers time each step)",
    "batch_iterator": "the config key `batches_per_step` (gradient accumulation)",
    "get_grad_sync_context": "the config key `batches_per_step` (DDP syncs gradients at each step's last batch)",
    "batch_chunks_schedule": "the config key `batches_per_step`, or Lightning's `GradientAccumulationScheduler`",
    "log_mp_scale": "the config key `diagnostics` (`optim/loss_scale` is logged under 16-mixed)",
    "debug": "a config key of your own (mlfab has no debug mode)",
    "autocast_context": "the config key `precision` (Lightning's autocast)",
    "scale_mixed_precision": "the config key `precision` (Lightning's gradient scaler under 16-mixed)",
    "get_fsdp_mixed_precision": "the config keys `strategy` / `precision` (Lightning's FSDP)",
    "multiprocessing_context": "a dataset's `worker_init` (workers start as torch's DataLoader starts them)",
    "log_directory": "`exp_dir` (the run directory; logs are under it)",
    "maybe_log_termination_time": "`max_steps` (`time/remaining_s` is logged)",
}


def own_classes(cls: type, task_base: type) -> list[type]:
    """`cls` and the classes it inherits methods from other than `task_base` and Lightning's under it: Task
    subclasses and mixins (`class T(DataMixin, mlfab.Task[C])`) alike."""
    return [klass for klass in cls.__mro__ if klass not in task_base.__mro__]


def _defined_in(klass: type, cls: type) -> str:
    return klass.__name__ if klass is cls else f"{klass.__name__} (a base class of {cls.__name__})"


def refuse_replaced_methods(cls: type, task_base: type) -> None:
    """Refuses a subclass defining, or inheriting from a mixin, a method of mlfab 0.2 that is never called here
    (`REPLACED_0_2_METHODS`)."""
    for klass in own_classes(cls, task_base):
        for name in klass.__dict__:
            if name in REPLACED_0_2_METHODS:
                raise TaskDefinitionError(
                    f"{_defined_in(klass, cls)}.{name} overrides a method of mlfab 0.2's own training loop, which "
                    f"this mlfab does not have, so it would never be called. Use {REPLACED_0_2_METHODS[name]} "
                    "instead (or rename the method if it is a helper of your own)."
                )


def find_config_class(cls: type, task_base: type) -> type | None:
    """The dataclass in `class MyTask(mlfab.Task[MyConfig])`, searched through the class hierarchy."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, task_base):
                for arg in get_args(base):
                    if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                        return arg
    return None


def typed_config_init(init: Any) -> Any:
    """Wraps `__init__` so a mapping becomes the typed Config before the user's code reads `config.x`."""
    if getattr(init, "_mlfab_typed", False):
        return init

    @functools.wraps(init)
    def wrapper(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(config, Mapping):
            config = build_config(type(self).config_class(), config)
        init(self, config, *args, **kwargs)

    wrapper._mlfab_typed = True  # type: ignore[attr-defined]
    return wrapper


# Lightning hooks that hold mlfab's own work (Task's implementation): an override of one runs that work whether or not
# it calls super(), once per call, where it calls super() or else after its own code. For the hooks marked True the
# work always comes after the override's code, so what the override logs is written with the rest.
MLFAB_HOOKS = {
    "setup": False,
    "on_train_start": False,
    "on_train_batch_start": False,
    "on_train_batch_end": True,
    "on_train_epoch_end": True,
    "on_train_end": True,
    "on_validation_batch_end": True,
    "on_test_batch_end": True,
    "on_predict_batch_end": True,
    "on_validation_epoch_end": True,
    "on_test_epoch_end": True,
    "on_predict_epoch_end": True,
    "on_predict_end": False,
    "on_save_checkpoint": False,
    "on_load_checkpoint": False,
}
_IN_OVERRIDE = "_mlfab_in_override"  # {hook: whether Task's work ran} of the overrides in progress, on the instance.


def _runs_task_work(name: str, override: Any, task_base: type) -> Any:
    @functools.wraps(override)
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls = self.__dict__.setdefault(_IN_OVERRIDE, {})
        if name in calls:  # An override further up the class hierarchy, reached through super().
            return override(self, *args, **kwargs)
        calls[name] = False
        try:
            result = override(self, *args, **kwargs)
        finally:
            ran = calls.pop(name)
        if not ran:
            getattr(task_base, name)(self, *args, **kwargs)
        return result

    hook._mlfab_runs_task_work = True  # type: ignore[attr-defined]
    return hook


def task_work_due(task: Any, name: str) -> bool:
    """Whether Task's own `name` hook does its work now: not when it is reached through super() from an override
    that runs it afterwards (see `MLFAB_HOOKS`)."""
    calls = task.__dict__.get(_IN_OVERRIDE)
    if not calls or name not in calls:
        return True
    if MLFAB_HOOKS[name]:
        return False
    calls[name] = True
    return True


# Hooks whose override must call super(), and why: an override without it would silently lose Task's work there.
_MODE_SWITCH = (
    "besides Lightning's switch of the model's mode, it switches a schedule-free optimizer to the weights evaluation "
    "must use (its evaluation weights, then back to the training weights)"
)
SUPER_REQUIRED = {
    "on_validation_model_eval": _MODE_SWITCH,
    "on_validation_model_train": _MODE_SWITCH,
    "on_test_model_eval": _MODE_SWITCH,
    "on_test_model_train": _MODE_SWITCH,
    "on_predict_model_eval": _MODE_SWITCH,
    "optimizer_step": "it warms the learning rate up (without it the rate stays at its first warmup value) and "
    "skips a step whose loss or gradient is not finite",
    "configure_gradient_clipping": "besides clipping, it checks the step's losses and gradients and skips a step "
    "where one is not finite (without it, NaN steps are applied), logs the rate the step applies (optim/lr) and "
    "refuses a rate set within the warmup",
}


def prepare_subclass(cls: type, task_base: type) -> None:
    refuse_replaced_methods(cls, task_base)
    for name in MLFAB_HOOKS:  # Defined here or in a class mixed in before the Task.
        override = getattr(cls, name)
        if override is not getattr(task_base, name) and not getattr(override, "_mlfab_runs_task_work", False):
            setattr(cls, name, _runs_task_work(name, override, task_base))
    for klass in own_classes(cls, task_base):  # A mixin's override too: it runs in place of Task's.
        for name in SUPER_REQUIRED:
            names = getattr(getattr(vars(klass).get(name), "__code__", None), "co_names", ("super", name))
            if "super" not in names or name not in names:
                raise TaskDefinitionError(
                    f"{_defined_in(klass, cls)}.{name} does not call super().{name}(): {SUPER_REQUIRED[name]}. "
                    "Call it in your override."
                )
    init = cls.__dict__.get("__init__")
    config_cls = find_config_class(cls, task_base)
    if init is None:
        if config_cls is None:
            return
        init = _next_init(cls, config_cls)
    elif config_cls is not None:
        _check_config_parameter(cls, init, config_cls)
        if _needs_annotation(init, config_cls):
            init.__annotations__["config"] = config_cls  # `def __init__(self, config)`: what jsonargparse must read.
    cls.__init__ = typed_config_init(init)  # type: ignore[misc]


def _check_config_parameter(cls: type, init: Any, config_cls: type) -> None:
    """The command line and `load_from_checkpoint` pass the config by name: an `__init__` whose first parameter has
    another name would fail deep inside jsonargparse."""
    try:
        params = list(inspect.signature(init).parameters.values())[1:2]
    except (TypeError, ValueError):
        return
    if params and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and params[0].name != "config":
        raise TaskDefinitionError(
            f"{cls.__name__}.__init__ takes its config as {params[0].name!r}; name it 'config' (def __init__(self, "
            f"config: {config_cls.__name__})): the command line and checkpoints pass it by that name."
        )


def _needs_annotation(init: Any, config_cls: type) -> bool:
    """An `__init__(self, config)` with no annotation, or one naming a base class of the declared config."""
    code = getattr(init, "__code__", None)
    if code is None or "config" not in code.co_varnames[:2]:
        return False
    given = init.__annotations__.get("config")
    return given is None or (isinstance(given, type) and given is not config_cls and issubclass(config_cls, given))


def _next_init(cls: type, config_cls: type) -> Any:
    """An `__init__` whose annotation names the config (jsonargparse reads it) and calls the next one in the MRO,
    which need not be a Task's."""

    def init(self: Any, config: Any) -> None:
        super(cls, self).__init__(config)  # type: ignore[arg-type]  # mypy takes the closure's `cls` for an instance

    init.__annotations__ = {"config": config_cls, "return": None}
    return init
