"""JsonLogger writes training values every few seconds by default, like the TensorBoard logger, so a lazy value
(`self.log_scalar("x", lambda: ...)`) is evaluated at those writes only; every step is an explicit choice."""

import json
import time
from pathlib import Path
from typing import Any

import pytest

import mlfab
from mlfab.testing import BoringConfig, BoringTask

STEPS = 200


def train_counting_evaluations(run_dir: Path, **json_kwargs: Any) -> tuple[list[int], list[int], float]:
    """The steps at which a lazy scalar was evaluated, the training steps in log.jsonl, and the run's seconds."""
    calls: list[int] = []

    class Counting(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.JsonLogger(self.exp_dir, **json_kwargs))

        def log_train_step(self, batch: Any, output: Any, state: mlfab.State) -> None:
            self.log_scalar("expensive", lambda: calls.append(state.num_steps) or 1.0)

    start = time.monotonic()
    Counting.launch(BoringConfig(max_steps=STEPS, valid_every_n_steps=None, run_dir=str(run_dir)), argv=[])
    seconds = time.monotonic() - start
    (exp,) = (run_dir / "counting").iterdir()
    lines = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    written = [line["step"] for line in lines if line["phase"] == "train" and "value/expensive" in line["scalars"]]
    return calls, written, seconds


@pytest.mark.integration
def test_json_logger_evaluates_lazy_values_every_few_seconds_by_default(tmp_path: Path) -> None:
    assert mlfab.JsonLogger(tmp_path).log_interval_seconds == mlfab.TensorboardLogger(tmp_path).log_interval_seconds
    calls, written, seconds = train_counting_evaluations(tmp_path / "default")
    assert calls[0] == 0 and calls == written  # The first step is written; each evaluation is a written line.
    # Besides the first step and the last (which the training loop may write to every logger), at most one write
    # per 2 s, however fast or slow this machine trains the 200 steps.
    periodic = [step for step in calls if step not in (0, STEPS - 1)]
    assert len(periodic) <= seconds // 2.0 < STEPS - 2


@pytest.mark.integration
def test_json_logger_evaluates_lazy_values_every_step_when_asked(tmp_path: Path) -> None:
    calls, written, _ = train_counting_evaluations(tmp_path / "every_step", log_interval_seconds=0)
    assert calls == written == list(range(STEPS))
