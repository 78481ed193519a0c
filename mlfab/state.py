"""`mlfab.State`: where training stands, as the task sees it in `get_loss` and `log_*_step`."""

from dataclasses import dataclass
from typing import Literal, get_args

Phase = Literal["train", "valid", "test"]
PHASES: tuple[Phase, ...] = get_args(Phase)


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
