"""Helpers for models made of several networks (a GAN's generator and discriminator, an actor and a critic)."""

from typing import Any

import torch
from torch import nn


def detached_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with the module's parameters detached: gradients reach the inputs (a generator's
    images, an actor's actions) but not the module's parameters, so one loss can train one network through another.
    With every network's loss returned by `get_loss` (summed for one backward pass), a single optimizer then trains
    each network on its own loss only (see examples/gan.py). Buffers (e.g. batch-norm statistics) are the module's."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs)
