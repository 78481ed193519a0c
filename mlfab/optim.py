"""The default optimizer: schedule-free AdamW with linear warmup, weight decay on weight matrices only."""

from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits parameters so decay applies to Linear/Conv weight matrices, never to biases, norms or embeddings."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_matrix = name == "weight" and param.ndim >= 2
            if is_matrix and not isinstance(module, nn.Embedding | nn.EmbeddingBag):
                decay.append(param)
            else:
                no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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

    b1, b2 = tuple(betas)
    return AdamWScheduleFree(
        param_groups(model, weight_decay), lr=lr, betas=(b1, b2), weight_decay=weight_decay, warmup_steps=warmup_steps
    )


def set_optimizer_mode(optimizers: Iterable[torch.optim.Optimizer], train: bool) -> None:
    """Schedule-free optimizers keep different weights for training and evaluation: switch them."""
    for opt in optimizers:
        fn = getattr(opt, "train" if train else "eval", None)
        if callable(fn) and not isinstance(opt, torch.optim.lr_scheduler.LRScheduler):
            fn()
