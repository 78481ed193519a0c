"""A checkpoint taken at a step that validates (periodic, or a signal in the step before a validation) resumes by
running that validation, so the resumed run continues exactly like the uninterrupted one, also when data is drawn
from numpy's global generator in the main process."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from dpshdl.dataset import Dataset
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration


class GlobalDraws(Dataset[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """Samples drawn from numpy's global generator (as much research code does), in the main process."""

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.normal(size=(4,)).astype(np.float32)
        return x, np.asarray(x.sum(), dtype=np.float32)


class Task(BoringTask):
    crash_at: int | None = None
    sigterm_at: int | None = None
    seen: dict[int, tuple[float, float]] = {}

    def get_dataset(self, phase: mlfab.Phase) -> GlobalDraws:
        return GlobalDraws()

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        if state.phase == "train":
            if state.num_steps == Task.crash_at:
                raise RuntimeError("preempted")  # As a kill would: no checkpoint at this step.
            if state.num_steps == Task.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)  # Stops at the end of this step, which was to validate.
            Task.seen[state.num_steps] = (float(batch[0].sum()), 0.0)
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            Task.seen[state.num_steps] = (Task.seen[state.num_steps][0], float(loss))
        return loss


def run(exp: Path, crash_at: int | None = None, sigterm_at: int | None = None) -> None:
    Task.crash_at, Task.sigterm_at = crash_at, sigterm_at
    config = BoringConfig(max_steps=12, valid_every_n_steps=5, save_every_n_steps=5, exp_dir=str(exp))
    Task.launch(config, argv=[])


@pytest.mark.parametrize("stop", ["crash after a periodic checkpoint", "SIGTERM in the step before a validation"])
def test_a_checkpoint_at_a_validation_step_resumes_with_that_validation(tmp_path: Path, stop: str) -> None:
    Task.seen = {}
    run(tmp_path / "whole")
    whole = dict(Task.seen)
    Task.seen = {}
    if stop.startswith("crash"):
        with pytest.raises(RuntimeError, match="preempted"):
            run(tmp_path / "cut", crash_at=8)  # The newest checkpoint is step 5's, written before its validation.
    else:
        with pytest.raises(SystemExit) as info:
            run(tmp_path / "cut", sigterm_at=4)  # Stops after step 5, without its validation.
        assert info.value.code == 128 + signal.SIGTERM
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(ckpts[-1], weights_only=True)["global_step"] == 5
    run(tmp_path / "cut")  # Resumes from step 5: validates first, then trains on.
    assert Task.seen == whole  # Every step's sample and loss, as if never interrupted.
    valid = [s for s, _ in read_scalars(tmp_path / "cut" / "tensorboard" / "valid")["loss/loss"]]
    assert {1, 5, 10} <= set(valid)
