"""Map-style data with dataloader workers and several ranks: each (rank, worker) draws its own random numbers, an
interrupted run's augmentation resumes exactly, and evaluation under DDP sees each sample once."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Keep the caller's entries.

# Training: 64 samples whose __getitem__ draws from torch's, numpy's and Python's global generators (augmentation).
# Validation: 9 samples, each with a loss of its own. Each rank records its batches' ids, draws and per-sample losses.
DDP_SCRIPT = """
import json, os, random, sys
import numpy as np
import torch
from mlfab.testing import BoringConfig, BoringTask

class Augmented(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        draws = np.array([torch.rand(()).item(), np.random.rand(), random.random()])
        return np.int64(i), x, np.float32(x.sum() + 10 * i), draws

class Ranks(BoringTask):
    def get_dataset(self, phase):
        return Augmented(64 if phase == "train" else 9)

    def get_loss(self, batch, state):
        ids, x, y, draws = batch
        per_sample = (self(x).squeeze(-1) - y) ** 2
        with open(f"{os.environ['OUT_DIR']}/{state.phase}_rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([state.num_steps, ids.tolist(), draws.tolist(), per_sample.tolist()]) + "\\n")
        return per_sample.mean()

if __name__ == "__main__":
    Ranks.launch(BoringConfig(max_steps=3, batch_size=4, valid_every_n_steps=100, valid_batches=10), argv=sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process DDP run on CPU (gloo) with 2 dataloader workers per rank; its directory."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "out").mkdir()
    script = tmp / "ranks_task.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=PYTHONPATH, OUT_DIR=str(tmp / "out"), MASTER_PORT=str(_free_port()))
    args = ["accelerator=cpu", "devices=2", "num_dataloader_workers=2", f"run_dir={tmp / 'runs'}"]
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _rows(run: Path, phase: str, rank: int) -> list[list]:
    return [json.loads(line) for line in (run / "out" / f"{phase}_rank{rank}.jsonl").read_text().splitlines()]


def test_map_style_workers_draw_their_own_numbers_on_each_rank(ddp_run: Path) -> None:
    train = [_rows(ddp_run, "train", r) for r in (0, 1)]
    assert [len(t) for t in train] == [3, 3]
    ids = [[i for _, batch, _, _ in t for i in batch] for t in train]
    assert all(len(set(i)) == len(i) == 12 for i in ids) and not set(ids[0]) & set(ids[1]), ids  # Split, not shared.
    for generator, name in enumerate(("torch", "numpy", "random")):
        drawn = [{d[generator] for _, _, draws, _ in t for d in draws} for t in train]
        assert not drawn[0] & drawn[1], f"dataloader workers of both ranks drew the same {name} numbers"


def test_ddp_validation_evaluates_each_sample_once(ddp_run: Path) -> None:
    seen = [i for r in (0, 1) for step, batch, _, _ in _rows(ddp_run, "valid", r) if step == 1 for i in batch]
    assert sorted(seen) == list(range(9))  # Lightning's padded split evaluated sample 0 twice.


def test_ddp_validation_loss_is_the_mean_over_the_set(ddp_run: Path) -> None:
    rows = [row for r in (0, 1) for row in _rows(ddp_run, "valid", r) if row[0] == 1]
    losses = {i: loss for _, batch, _, per_sample in rows for i, loss in zip(batch, per_sample, strict=True)}
    run = next((ddp_run / "runs").glob("*/run_*"))
    written = dict(read_scalars(run / "tensorboard" / "valid")["loss/loss"])
    assert written[1] == pytest.approx(np.mean(list(losses.values())), rel=1e-5)


class Augmented(torch.utils.data.Dataset):
    """32 samples (4 shuffled batches of 8 an epoch) with an augmentation drawn from every global generator."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        x = x + torch.randn(4) + float(np.random.rand()) + random.random()
        return x, x.sum()


class AugmentedTask(BoringTask):
    losses: dict[int, float] = {}

    def get_dataset(self, phase: mlfab.Phase) -> Augmented:
        return Augmented()

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            AugmentedTask.losses[state.num_steps] = loss.item()
        return loss


@pytest.mark.parametrize("stop_at", [4, 6])  # At an epoch's end, and half-way through the second epoch.
def test_map_style_augmentation_in_workers_resumes_exactly(tmp_path: Path, stop_at: int) -> None:
    def launch(exp_dir: Path, max_steps: int) -> dict[int, float]:
        AugmentedTask.losses = {}
        config = BoringConfig(
            exp_dir=str(exp_dir),
            max_steps=max_steps,
            num_dataloader_workers=2,
            valid_every_n_steps=None,
            save_every_n_seconds=None,
            valid_batches=0,
        )
        AugmentedTask.launch(config, argv=[])
        return AugmentedTask.losses

    expected = launch(tmp_path / "ref", 12)
    launch(tmp_path / "run", stop_at)
    got = launch(tmp_path / "run", 12)  # Resumes from the final checkpoint of step `stop_at`.
    assert got == {step: expected[step] for step in range(stop_at, 12)}
