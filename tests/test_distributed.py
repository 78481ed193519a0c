"""Multi-process training on CPU (gloo): DDP on one machine, two simulated nodes, torchrun.

Each rank records the ids of the samples it trained on, its validation losses and its final weights, so
the tests can check what a user cares about: no sample seen twice, identical weights, one run directory,
logs written once, validation scalars averaged over ranks.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlfab.testing import read_scalars

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Keep the caller's entries.

SCRIPT = """
import json, os, sys
import numpy as np
import torch
import torch.nn.functional as F
from dpshdl.dataset import Dataset
from torch import nn
import mlfab
from mlfab.testing import BoringConfig, BoringTask

class Ids(Dataset):
    '''Sample i has id i; each global worker reads ids worker, worker + n, worker + 2n, ...'''

    def worker_init(self, worker_id, num_workers):
        self.next_id, self.stride = worker_id, num_workers

    def next(self):
        i = self.next_id
        self.next_id += self.stride
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return np.int64(i), x, np.float32(x.sum())

class MapIds(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return np.int64(i), x, np.float32(x.sum())

class Distributed(BoringTask):
    def get_dataset(self, phase):
        return MapIds() if os.environ.get("DATASET") == "map" else Ids()

    def get_loss(self, batch, state):
        ids, x, y = batch
        loss = F.mse_loss(self(x), y)
        out = os.environ["OUT_DIR"]
        with open(f"{out}/{state.phase}_rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([state.num_steps, ids.tolist(), loss.item()]) + "\\n")
        with open(f"{out}/{state.phase}_draws_rank{self.global_rank}.jsonl", "a") as f:  # As dropout would draw.
            f.write(json.dumps([torch.rand(()).item(), float(np.random.rand())]) + "\\n")
        return loss

    def on_train_end(self):
        torch.save(self.layer.state_dict(), f"{os.environ['OUT_DIR']}/weights_rank{self.global_rank}.pt")
        with open(f"{os.environ['OUT_DIR']}/exp_dir_rank{self.global_rank}.txt", "w") as f:
            f.write(str(self.exp_dir))

if __name__ == "__main__":
    Distributed.launch(BoringConfig(max_steps=8, valid_every_n_steps=4, valid_batches=2), argv=sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_script(tmp_path: Path) -> Path:
    script = tmp_path / "distributed_task.py"
    script.write_text(SCRIPT)
    (tmp_path / "out").mkdir()
    return script


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": PYTHONPATH, "OUT_DIR": str(tmp_path / "out"), **extra}


def read_rank(tmp_path: Path, phase: str, rank: int) -> list[tuple[int, list[int], float]]:
    path = tmp_path / "out" / f"{phase}_rank{rank}.jsonl"
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]  # type: ignore[misc]


def check_two_ranks(tmp_path: Path, stdout: str) -> None:
    train = [read_rank(tmp_path, "train", r) for r in (0, 1)]
    assert [len(t) for t in train] == [8, 8]
    ids = [{i for _, batch, _ in t for i in batch} for t in train]
    assert len(ids[0]) == len(ids[1]) == 8 * 8
    assert not ids[0] & ids[1], "two ranks trained on the same samples"

    # Each rank has its own torch and numpy streams (dropout masks, augmentation): torch's was the same on every rank.
    draws = [[json.loads(x) for x in (tmp_path / "out" / f"train_draws_rank{r}.jsonl").open()] for r in (0, 1)]
    for generator in (0, 1):  # torch, numpy
        assert not {d[generator] for d in draws[0]} & {d[generator] for d in draws[1]}, "ranks drew the same numbers"

    w0, w1 = (torch.load(tmp_path / "out" / f"weights_rank{r}.pt") for r in (0, 1))
    assert torch.equal(w0["weight"], w1["weight"]) and torch.equal(w0["bias"], w1["bias"])

    runs = list((tmp_path / "runs" / "distributed").iterdir())
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    exp_dirs = {(tmp_path / "out" / f"exp_dir_rank{r}.txt").read_text() for r in (0, 1)}
    assert exp_dirs == {str(runs[0])}
    assert len(list((runs[0] / "tensorboard" / "valid").glob("events.*"))) == 1
    assert stdout.count("[train] step 0/8") == 1  # Logs are written by rank zero only.

    # The validation loss written is the mean of both ranks' validation losses.
    written = dict(read_scalars(runs[0] / "tensorboard" / "valid")["loss/loss"])
    for step in (1, 4, 8):
        per_rank = [np.mean([loss for s, _, loss in read_rank(tmp_path, "valid", r) if s == step]) for r in (0, 1)]
        assert written[step] == pytest.approx(np.mean(per_rank), rel=1e-5)
        assert per_rank[0] != pytest.approx(per_rank[1])  # The ranks validated on different data.


@pytest.mark.parametrize(
    ("dataset", "strategy", "compile"),
    [
        ("dpshdl", "auto", "false"),
        ("map", "auto", "false"),
        ("dpshdl", "ddp_spawn", "false"),
        ("dpshdl", "auto", "true"),
    ],
)
def test_ddp_two_processes_on_cpu(tmp_path: Path, dataset: str, strategy: str, compile: str) -> None:  # noqa: A002
    """Also with compile=true: the compiled forward runs inside Lightning's DDP wrapper on each rank."""
    script = write_script(tmp_path)  # ddp_spawn pickles the Trainer and the task into each process.
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "accelerator=cpu",
            "devices=2",
            f"strategy={strategy}",
            f"compile={compile}",
            f"run_dir={tmp_path / 'runs'}",
        ],
        env=env_for(tmp_path, MASTER_PORT=str(free_port()), DATASET=dataset),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_two_ranks(tmp_path, proc.stdout)
    assert proc.stdout.count("torch.compile (torch's defaults): ") == (compile == "true")


def test_two_simulated_nodes(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                "accelerator=cpu",
                "devices=1",
                "num_nodes=2",
                f"run_dir={tmp_path / 'runs'}",
            ],
            env=env_for(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node)),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    check_two_ranks(tmp_path, outputs[0][0] + outputs[1][0])


def test_torchrun_two_processes(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
            "accelerator=cpu",
            f"run_dir={tmp_path / 'runs'}",
        ],
        env=env_for(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_two_ranks(tmp_path, proc.stdout)


def test_the_test_subcommand_gives_each_rank_its_own_batches_of_an_endless_set(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "test",
            "--model.config.accelerator=cpu",
            "--model.config.devices=2",
            f"--model.config.run_dir={tmp_path / 'runs'}",
        ],
        env=env_for(tmp_path, MASTER_PORT=str(free_port())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tested = [read_rank(tmp_path, "test", r) for r in (0, 1)]
    assert [len(t) for t in tested] == [2, 2]  # valid_batches of the endless test set on each rank.
    ids = [{i for _, batch, _ in t for i in batch} for t in tested]
    assert len(ids[0]) == len(ids[1]) == 2 * 8 and not ids[0] & ids[1]


NAN_ON_ONE_RANK = """
import sys
import torch
from mlfab.testing import BoringConfig, BoringTask

class RankNaN(BoringTask):
    def get_loss(self, batch, state):
        loss = super().get_loss(batch, state)
        bad = state.phase == "train" and state.num_steps == 1 and self.global_rank == 1
        return {"mse": loss, "aux": torch.tensor(float("nan") if bad else 0.0)}

    def on_training_end(self, state):
        w = self.layer.weight.detach().clone()
        both = [torch.zeros_like(w) for _ in range(2)]
        torch.distributed.all_gather(both, w)
        print(f"RANK {self.global_rank} skipped {self.nonfinite_guard.total} same {torch.equal(*both)}", flush=True)

if __name__ == "__main__":
    RankNaN.launch(BoringConfig(max_steps=4, valid_batches=0), argv=sys.argv[1:])
"""


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """Each rank decided alone: rank 1 skipped the step, rank 0 applied it, and the replicas drifted apart."""
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    proc = subprocess.run(
        [sys.executable, str(script), "accelerator=cpu", "devices=2", f"run_dir={tmp_path / 'runs'}"],
        env=env_for(tmp_path, MASTER_PORT=str(free_port())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The two processes' lines may run together on the shared stdout: each record is matched on its own.
    assert sorted(re.findall(r"RANK (\d) skipped (\d) same (True|False)", proc.stdout)) == [
        ("0", "1", "True"),
        ("1", "1", "True"),
    ]
    assert "Step 1 skipped: loss on another process is not finite" in proc.stderr + proc.stdout
