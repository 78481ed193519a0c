"""The `compile` config key: `torch.compile` of the task's forward, in place, and what compiling cost.

`nn.Module.compile` compiles the module's call, so the task's parameter names (and its checkpoints' keys) stay
those of an eager run: a checkpoint loads and resumes either way. It runs when the task is called (`self(x)` in
`get_loss`), inside whatever Lightning wrapped the task in (DDP included), the backward too. The seconds spent
compiling (Dynamo, Inductor, the backward compiled at the first backward, and any later recompilation: evaluation
mode, a new input shape) are printed after the first training step and logged as `time/compile_s`.
"""

from typing import Any

from torch import nn

from mlfab._lightning import compile_seconds
from mlfab.errors import ConfigError

COMPILE_S = "time/compile_s"  # The tag of the seconds spent compiling (left off the terminal line).
_NAMESPACE, _, _KEY = COMPILE_S.partition("/")


class Compiled:
    """A task compiled with `options` (True: torch's defaults; or torch.compile's keyword arguments)."""

    def __init__(self, module: nn.Module, options: bool | dict[str, Any], device_type: str) -> None:
        self.options = {} if options is True else dict(options)  # type: ignore[arg-type]
        if self.options.get("mode") == "reduce-overhead" and device_type != "cuda":  # torch then just compiles.
            raise ConfigError(
                f"compile: mode reduce-overhead captures CUDA graphs, and this run is on {device_type}, where torch "
                "skips them and compiles as mode default does. Set compile='{mode: default}' (or true), or run on a "
                "CUDA device."
            )
        self.start = compile_seconds()
        self.checked = False
        try:
            module.compile(**self.options)
        except Exception as e:  # A backend or option torch does not know: it checks them here, before any run.
            raise ConfigError(
                f"compile: torch.compile refused {self.options}: {type(e).__name__}: {e}. Fix the key's `backend` / "
                "`options` (see torch.compile), or set compile=true for torch's defaults."
            ) from None
        compiled = module._compiled_call_impl
        assert compiled is not None
        self.called = False

        def first_calls(*args: Any, **kwargs: Any) -> Any:  # Until the first step's check, then removed.
            self.called = True
            return compiled(*args, **kwargs)

        module._compiled_call_impl = first_calls
        self._compiled = compiled

    def step_ended(self, task: Any) -> None:
        """After each training step: the first time, check that compiling happened and say what it cost; on every
        step log the seconds spent so far (they grow when something recompiles; a graph this process compiled
        for another instance of the task's class is reused)."""
        if not self.checked:
            self._check_called(task, "training step", "get_loss")
            if task.trainer.is_global_zero:
                how = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "torch's defaults"
                spent = self._spent()
                print(f"torch.compile ({how}): {spent:.1f} s compiling in the first step ({COMPILE_S})", flush=True)
        task.log_scalar(_KEY, self._spent, namespace=_NAMESPACE)  # Lazy: read only at the steps a logger writes.

    def evaluated(self, task: Any, phase: str) -> None:
        """After the first batch of a `validate`, `test` or `predict` run (not one inside a fit, which may come before
        the first training step; callers skip it once `checked`): the same check as after the first training step."""
        self._check_called(task, f"{phase} batch", "get_prediction" if phase == "predict" else "get_loss")

    def _check_called(self, task: Any, first: str, method: str) -> None:
        self.checked = True
        task._compiled_call_impl = self._compiled
        if not self.called:
            raise ConfigError(
                f"compile: {type(task).__name__} was never called as self(...) in its first {first}, so "
                "torch.compile compiled nothing (it compiles the task's forward, which runs when the task is "
                f"called). Call self(x) in {method}, or compile submodules yourself (self.net = "
                "torch.compile(self.net)) and set compile=false."
            )

    def _spent(self) -> float:
        return compile_seconds() - self.start
