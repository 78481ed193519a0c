"""The default optimizer: schedule-free AdamW with linear warmup, weight decay on weight matrices only."""

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from mlfab.config import field_default
from mlfab.errors import ConfigError, TaskDefinitionError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits parameters so decay applies to every parameter of 2 or more dimensions (Linear, Conv, attention and RNN
    weights, embedding tables, a model's own 2-D tables) and never to biases or norms (1-D), as mlfab 0.2 did: its
    per-module exclusions (norms, embeddings) never applied, since it met every parameter first through the task
    itself, a module of neither kind."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # Any parameter name: MultiheadAttention's `in_proj_weight`, an LSTM's `weight_ih_l0` are matrices too.
            if param.ndim >= 2:
                decay.append(param)
            else:
                no_decay.append(param)
    groups = [  # "decay" marks the group a changed weight_decay applies to on resume (mlfab/resume.py).
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    return [g for g in groups if g["params"]]


def schedule_free_adamw(
    model: nn.Module,
    *,
    lr: float,
    betas: Iterable[float],
    weight_decay: float,
    warmup_steps: int,
) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    groups = param_groups(model, weight_decay)
    if not groups:
        total = sum(1 for _ in model.parameters())
        why = f"all {total} of its parameters are frozen (requires_grad=False)" if total else "it has no parameters"
        raise TaskDefinitionError(
            f"{type(model).__name__} has nothing to train: {why}, so the default optimizer (build_optimizer) gets "
            "no parameters. Create the model's layers in __init__ and leave some trainable, or override "
            "build_optimizer (or configure_optimizers) for a task that trains nothing."
        )
    for group in groups:  # The warmup is mlfab's (`warm_up`), so the applied rate is each group's "lr".
        group.update(base_lr=lr, linear_warmup_steps=warmup_steps)
    b1, b2 = tuple(betas)
    if b1 == 0:  # It moves the weights between train and eval mode by 1 - 1/beta1.
        raise ConfigError(
            f"betas={[b1, b2]}: the default optimizer, schedule-free AdamW, needs betas[0] > 0 (its evaluation weights "
            "divide by it). Set betas[0] above 0 (0.9 is the default), or build your own optimizer (build_optimizer)."
        )
    optimizer = AdamWScheduleFree(groups, lr=lr, betas=(b1, b2), weight_decay=weight_decay, warmup_steps=0)
    warm_up([optimizer])
    return optimizer


def warm_up(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Sets the learning rate of the next step in each parameter group with a linear warmup (those of
    `schedule_free_adamw`): `base_lr * (k + 1) / linear_warmup_steps` for the optimizer's step count k below
    `linear_warmup_steps`, then `base_lr`, the very numbers schedule-free AdamW's own warmup computes. Done here
    rather than inside the optimizer so that `param_group["lr"]` is the rate applied, as Lightning's
    LearningRateMonitor and mlfab's `optim/lr` show it. Called at the start of training and after every step.

    A rate something else set since (StochasticWeightAveraging, LearningRateFinder, your own code) is theirs from
    then on (`warmup_lr` None), until a relaunch changes `learning_rate` or `warmup_steps`; during the warmup, which
    would overwrite it, it is refused."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "base_lr" not in group or group.get("warmup_lr", 0.0) is None:
                continue
            if _rate_taken(group):
                group["warmup_lr"] = None  # The rate is theirs from now on.
            elif group.get("k", 0) <= group["linear_warmup_steps"]:  # The warmup, and its last rate once.
                group["lr"] = group["warmup_lr"] = warmup_rate(group)


def refuse_rate_taken_within_warmup(optimizer: torch.optim.Optimizer) -> None:
    """Before each update (after the `on_before_optimizer_step` hooks): a rate set by something other than the
    warmup, within the warmup, is refused before any step applies it (the warmup would overwrite it after the step)."""
    for group in optimizer.param_groups:
        k, n = group.get("k", 0), group.get("linear_warmup_steps", 0)
        if k < n and _rate_taken(group):
            raise ConfigError(
                f"The default optimizer's learning rate was set to {group['lr']} by something other than its "
                "warmup (a callback such as StochasticWeightAveraging or LearningRateFinder, Tuner.lr_find, "
                f"or your own code) within the warmup ({k} of warmup_steps={n} steps done), which sets the "
                "rate itself. Set warmup_steps=0, or change the rate once the warmup is over."
            )


def _rate_taken(group: dict[str, Any]) -> bool:
    """Whether a parameter group's rate was set since the warmup last set it (and is not already someone else's)."""
    last = group.get("warmup_lr", group["lr"])
    return "base_lr" in group and last is not None and last != group["lr"]


def warmup_rate(group: dict[str, Any]) -> float:
    """The rate of a parameter group of `schedule_free_adamw` at its step count, by its warmup."""
    k, n = group.get("k", 0), group["linear_warmup_steps"]
    return group["base_lr"] * ((k + 1) / n) if k < n else group["base_lr"]


def set_optimizer_mode(optimizers: Iterable[torch.optim.Optimizer], train: bool) -> None:
    """Schedule-free optimizers keep different weights for training and evaluation: switch them."""
    for opt in optimizers:
        fn = getattr(opt, "train" if train else "eval", None)
        if callable(fn) and not isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
            fn()


def save_in_eval_mode(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Schedule-free optimizers must be saved in eval mode: the checkpoint gets the evaluation weights with
    the optimizer state that matches them. The training weights and state go in too, so a resume continues
    from exactly the same numbers instead of re-deriving them; and the live weights are put back bit for
    bit, so saving never changes the run."""
    trainer = module.trainer
    if not any(g.get("train_mode") for opt in trainer.optimizers for g in opt.param_groups):
        return
    # The checkpoint IO's copies where it keeps them for this save anyway (a background save's host buffers).
    staged = getattr(trainer.strategy.checkpoint_io, "staged_copies", None)
    copy = staged() if callable(staged) and trainer.strategy.is_global_zero else None
    copy = copy or (lambda t: t.detach().clone())
    train_weights = {k: copy(v) for k, v in checkpoint["state_dict"].items()}
    set_optimizer_mode(trainer.optimizers, train=False)
    eval_weights = trainer.strategy.lightning_module_state_dict()
    checkpoint["state_dict"] = {k: copy(v) for k, v in eval_weights.items()}
    checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
    module.load_state_dict(train_weights)  # Not `train()`: its round trip rounds the weights.
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["train_mode"] = True
    checkpoint["mlfab"]["train_state_dict"] = train_weights
    checkpoint["mlfab"]["train_optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]


def use_training_weights(checkpoint: dict[str, Any]) -> None:
    """When resuming training, load the exact training weights saved by `save_in_eval_mode`."""
    saved = checkpoint.get("mlfab", {})
    if "train_state_dict" in saved:
        checkpoint["state_dict"] = saved["train_state_dict"]
        checkpoint["optimizer_states"] = saved["train_optimizer_states"]


SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _found_in(built: Any, kinds: type | tuple[type, ...]) -> list[Any]:
    """The optimizers or schedulers (`kinds`) in any of Lightning's `configure_optimizers` forms (one, a pair, a
    dict, lists of dicts, two lists)."""
    if isinstance(built, kinds):
        return [built]
    values = built.values() if isinstance(built, dict) else built if isinstance(built, list | tuple) else ()
    return [found for value in values for found in _found_in(value, kinds)]


def lightning_optimizers(built: Any, task: str, warmup_steps: int) -> Any:
    """What `build_optimizer` or `configure_optimizers` returned, as Lightning takes it: an `(optimizer, scheduler)`
    pair (mlfab 0.2's) becomes Lightning's dict with the scheduler stepped after every optimizer step; anything else
    is Lightning's already (two optimizers, for one, stay two). A scheduler on mlfab's default optimizer (in any
    form) replaces its warmup (`warm_up` then leaves the rate to the scheduler), so a config that also asks for
    warmup steps is refused instead of one of the two being silently overridden."""
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.optim.Optimizer):
        if isinstance(built[1], SCHEDULERS):
            built = {"optimizer": built[0], "lr_scheduler": {"scheduler": built[1], "interval": "step"}}
    groups = [g for s in _found_in(built, SCHEDULERS) for g in s.optimizer.param_groups if "base_lr" in g]
    if groups and warmup_steps:
        raise TaskDefinitionError(
            f"{task} returned a learning-rate scheduler for the default optimizer (from build_optimizer or "
            f"configure_optimizers), whose warmup (warmup_steps={warmup_steps}) also sets the rate. Set "
            "warmup_steps=0 and put the warmup in your schedule, or return the optimizer alone."
        )
    for group in groups:
        group.pop("base_lr", None)  # The scheduler's, from now on.
    return built


OPTIMIZER_CONFIG_KEYS = ("learning_rate", "betas", "weight_decay", "warmup_steps")  # What the default optimizer reads.


def reads_recorded(config: Any) -> tuple[Any, set[str]]:
    """A copy of `config` that records the names read from it, and that set. The copy is of a subclass of the
    config's class, so `isinstance` and `dataclasses` see the config as it is."""
    reads: set[str] = set()
    cls = type(config)

    def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807 - the hook itself
        reads.add(name)
        return object.__getattribute__(self, name)  # (Config classes define no __getattribute__ of their own.)

    recording = copy.copy(config)
    object.__setattr__(recording, "__class__", type(cls.__name__, (cls,), {"__getattribute__": __getattribute__}))
    return recording, reads


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value  # `betas` from YAML is a list.


def checks_optimizer_reads(configure: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`configure_optimizers` (Task's, or a task's own, wrapped when its class is defined) building the optimizer
    from a config that records the keys read, then refusing the optimizer keys set that it did not read, and handing
    what it returned to `lightning_optimizers`. An override calling `super().configure_optimizers()` is checked once,
    as a whole."""
    if getattr(configure, "_mlfab_checks_reads", False):
        return configure

    @functools.wraps(configure)
    def configure_optimizers(task: Any) -> Any:
        if getattr(task, "_building_optimizer", False):  # Called by an override that is being checked.
            return configure(task)
        config = task.config
        task.config, reads = reads_recorded(config)
        task._building_optimizer = True
        try:
            built = configure(task)
        finally:
            task.config, task._building_optimizer = config, False
        refuse_unread_optimizer_keys(config, reads | keys_held(config, built), type(task).__name__)
        # Also what an override returns: a scheduler it adds to the default optimizer takes the rate from its warmup.
        return lightning_optimizers(built, type(task).__name__, config.warmup_steps)

    configure_optimizers._mlfab_checks_reads = True  # type: ignore[attr-defined]
    return configure_optimizers


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in value) if isinstance(value, list | tuple) else (float(value),)
    except (TypeError, ValueError, RuntimeError):
        return None


def keys_held(config: Any, built: Any) -> set[str]:
    """The optimizer keys whose values a built optimizer holds in a parameter group (`lr`, or a scheduler's
    `initial_lr`; `betas`; `weight_decay`): a rate read in `__init__` and passed on is used, though not read while
    the optimizer was built."""
    groups = [group for optimizer in _found_in(built, torch.optim.Optimizer) for group in optimizer.param_groups]
    fields = {"learning_rate": ("lr", "initial_lr"), "betas": ("betas",), "weight_decay": ("weight_decay",)}
    return {
        key
        for key, names in fields.items()
        if any(_floats(group.get(name)) == _floats(getattr(config, key)) for group in groups for name in names)
    }


def refuse_unread_optimizer_keys(config: Any, reads: set[str], task: str) -> None:
    """The default optimizer's keys set away from their defaults that the task's own optimizer did not read while
    it was built: the run would train with other values than config.yaml records. Refused, naming them."""
    defaults = {f.name: _plain(field_default(f)) for f in dataclasses.fields(config)}
    unread = [k for k in OPTIMIZER_CONFIG_KEYS if k not in reads and _plain(getattr(config, k)) != defaults.get(k)]
    if unread:
        given = ", ".join(f"{k}={getattr(config, k)!r} (default {defaults.get(k)!r})" for k in unread)
        raise ConfigError(
            f"{given}: {task} builds its own optimizer (build_optimizer / get_optimizer_builder / "
            "configure_optimizers), which does not "
            f"read {'these keys' if len(unread) > 1 else 'this key'} while building it, and no parameter group of "
            "its optimizer holds the value, so the run would not use it. Read it "
            f"there (self.config.{unread[0]}) or leave it at its default."
        )
