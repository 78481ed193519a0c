"""Skipping optimizer steps whose loss or gradient is not finite, and stopping when it keeps happening.

The check runs where Lightning clips gradients (after backward, before the optimizer updates anything):
one total gradient norm, which clipping needs anyway, summed with the loss, and one device sync per step
to read that number. The norms it computed are kept for the `optim/grad_norm` diagnostic
(`NonFiniteGuard.take_grad_norm`, `total_norm`), which adds no work at the steps no logger writes.
"""

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from mlfab._lightning import foreach_norm
from mlfab.errors import NonFiniteError, TaskDefinitionError

log = logging.getLogger(__name__)


def loss_parts(loss: Any, task_name: str) -> dict[str, Tensor]:
    """`get_loss`'s result as named scalar tensors, or an error saying what it must return."""
    parts = {"loss": loss} if isinstance(loss, Tensor) else loss
    if not isinstance(parts, Mapping) or not parts:
        raise TaskDefinitionError(
            f"{task_name}.get_loss returned {type(loss).__name__}; it must return a scalar Tensor "
            "or a non-empty dict of scalar Tensors."
        )
    for name, part in parts.items():
        if not isinstance(part, Tensor) or part.numel() != 1:
            what = f"a tensor of shape {tuple(part.shape)}" if isinstance(part, Tensor) else type(part).__name__
            raise TaskDefinitionError(
                f"{task_name}.get_loss returned {what} for loss {name!r}; each loss must be a scalar "
                "Tensor (reduce it, e.g. with .mean())."
            )
    if torch.is_grad_enabled() and not any(part.requires_grad for part in parts.values()):  # Training, not eval.
        names = ", ".join(repr(name) for name in parts)
        raise TaskDefinitionError(
            f"{task_name}.get_loss returned a loss ({names}) that does not depend on any trainable parameter, so "
            "there is nothing to train: compute it from the model's output (not under torch.no_grad(), not from "
            ".detach(), .item() or numpy values), and leave some parameters with requires_grad=True."
        )
    return dict(parts)


class SkipStep(Exception):  # noqa: N818 - control flow, never reaches the user
    """Raised inside the optimizer closure to abandon this step before any parameter changes."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int | None) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self.last_reason = ""
        self.last_skip = ""  # "step N: <what> not finite", for the logs.
        # The last check's gradient norm, before clipping: the total (0-d) or each gradient's (1-d, see total_norm).
        self.grad_norm: Tensor | None = None

    def clip_and_check(
        self,
        params: Iterable[Tensor],
        losses: Mapping[str, Tensor],
        max_norm: float | None,
        check_grads: bool = True,
        reduce: Callable[..., Tensor] | None = None,
    ) -> None:
        """Clips (with `max_norm`) and raises SkipStep where a loss or (with `check_grads`) a gradient is not finite.
        With `reduce` (the strategy's sum over ranks, under DDP) every rank skips where any rank's loss is not finite:
        a step skipped on one rank only would leave the replicas apart."""
        with_grad = [p for p in params if p.grad is not None]
        values = [v.detach() for v in losses.values()]
        self.grad_norm = None
        # fp16 gradients' norms in float32: a norm over 65504 of finite entries was inf (the step skipped, or every
        # gradient zeroed by clipping). Others as they are (bf16's range is float32's).
        half = any(p.grad.dtype == torch.float16 for p in with_grad if p.grad is not None)
        if with_grad and max_norm:  # The total norm clipping computes is not finite when any gradient is not.
            if half:
                norm = torch.nn.utils.get_total_norm([p.grad.float() for p in with_grad if p.grad is not None])
                torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
            self.grad_norm = norm
            if check_grads:
                values.append(norm)
        elif with_grad and check_grads:
            grads = [g.float() if half else g for p in with_grad if (g := p.grad) is not None]  # (Filter: for mypy.)
            norms: tuple[Tensor, ...] | list[Tensor] = foreach_norm(grads)
            if any(n.device != norms[0].device for n in norms):  # Parameters spread over devices.
                norms = [n.to(norms[0].device) for n in norms]
            self.grad_norm = stacked = torch.stack(norms)  # Their total is taken only where it is logged.
            values.append(stacked.sum(dtype=torch.float32))  # fp16 norms could overflow their sum.
        if not values:
            return
        if reduce is not None:  # A 0/1 flag per rank, summed: exact, and the same decision everywhere.
            flags = torch.stack([~torch.isfinite(v.float().sum()) for v in values]).any().float()
            if reduce(flags, reduce_op="sum").item() == 0:
                self.in_a_row = 0
                return
        else:  # One number and one device sync per step: the sum is finite when every part is (or it overflowed).
            total = sum((v.to(values[0].device) for v in values[1:]), values[0])
            if math.isfinite(total.item()) or all(math.isfinite(v.float().sum().item()) for v in values):
                self.in_a_row = 0
                return
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        if bad:
            self.last_reason = f"loss {', '.join(repr(k) for k in bad)}"
        elif reduce is not None and all(math.isfinite(v.float().sum().item()) for v in values):
            self.last_reason = "loss on another process"
        else:
            self.last_reason = "the gradient"
        raise SkipStep

    SAVED = ("in_a_row", "total", "last_reason", "last_skip")

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run continues from: the totals and the current streak (which `max_in_a_row` counts)."""
        return {k: getattr(self, k) for k in self.SAVED}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in self.SAVED:  # Only these: a checkpoint's other entries never become attributes.
            if key in state:
                setattr(self, key, state[key])

    def take_grad_norm(self) -> Tensor | None:
        """The gradient norm of the last check (for `total_norm`), once: None after it was taken, and when the check
        computed none (no clipping, and no gradient check: under 16-mixed loss scaling, which checks them itself)."""
        norm, self.grad_norm = self.grad_norm, None
        return norm

    def skipped(self, step: int) -> None:
        self.in_a_row += 1
        self.total += 1
        self.last_skip = f"step {step}: {self.last_reason} not finite"
        log.warning("Step %d skipped: %s is not finite (%d skipped so far)", step, self.last_reason, self.total)

    def check_streak(self, step: int) -> None:
        """Stops the run (NonFiniteError) once `max_in_a_row` steps in a row were skipped."""
        if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row:
            # `last_reason` reads "loss 'x'" or "the gradient" (as in "the gradient is not finite"); the article
            # does not fit after "a non-finite".
            what = self.last_reason.removeprefix("the ")
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite {what} (last at step {step}); "
                "stopping (max_nonfinite_steps_in_a_row). The checkpoints written so far are intact. Lower the "
                "learning rate, check the data, or raise max_nonfinite_steps_in_a_row."
            )


def total_norm(norm: Tensor) -> float:
    """The total 2-norm of the gradients from what `NonFiniteGuard.take_grad_norm` returned: the total itself (0-d,
    from clipping) or the 2-norm of the gradients' norms (1-d), as `torch.nn.utils.clip_grad_norm_` combines them,
    in at least float32 (fp16 squares overflow). One small reduction and a device sync, when it is logged."""
    if norm.ndim == 0:
        return float(norm)
    return float(torch.linalg.vector_norm(norm, dtype=torch.promote_types(norm.dtype, torch.float32)))
