"""`mlfab.State`: where training stands, as the task sees it in `get_loss` and `log_*_step`."""

import time
from dataclasses import dataclass
from typing import Literal, get_args

Phase = Literal["train", "valid", "test"]
PHASES: tuple[Phase, ...] = get_args(Phase)
# The phases mlfab writes logs for (a logger's `log_interval_seconds`, `Logs.phase`): those above and "predict", what
# is logged during Lightning's `trainer.predict` (the `predict` subcommand).
LogPhase = Literal["train", "valid", "test", "predict"]
# What a logger's `write` may get as `Logs.phase`: a log phase, or "metrics", the values Lightning hands a logger's
# `log_metrics` (`self.log` of a plain LightningModule, callbacks such as LearningRateMonitor): Lightning does not
# say which phase those belong to (their names do: `val_loss`), nor the training time and samples so far.
WritePhase = LogPhase | Literal["metrics"]


@dataclass(frozen=True)
class State:
    """A snapshot of the run's counters, consistent with the Lightning Trainer's own.

    `num_steps` is the number of optimizer steps completed before this batch (so the first step is 0),
    the same step number the batch's logs are written at. `num_samples` counts training samples over
    all devices. Times are wall-clock seconds; `elapsed_time_s` continues across resumes.
    """

    num_steps: int
    num_samples: int
    num_valid_steps: int
    phase: Phase
    start_time_s: float
    elapsed_time_s: float

    @classmethod
    def init_state(cls) -> "State":
        """The state before the first step (mlfab 0.2's `State.init_state()`)."""
        return cls(num_steps=0, num_samples=0, num_valid_steps=0, phase="train", start_time_s=time.time(),
                   elapsed_time_s=0.0)  # fmt: skip

    @property
    def training(self) -> bool:
        return self.phase == "train"

    def num_phase_steps(self, phase: Phase) -> int:
        """Steps of `phase` so far: optimizer steps for "train", validations done for "valid" (as 0.2 counted)."""
        if phase == "train":
            return self.num_steps
        if phase == "valid":
            return self.num_valid_steps
        raise ValueError(f"num_phase_steps counts 'train' and 'valid' steps, not {phase!r}")
