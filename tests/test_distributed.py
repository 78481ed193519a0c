"""Multi-process training on CPU (gloo): DDP on one machine, two simulated nodes, torchrun.

Each rank records the ids of the samples it trained on, its validation losses and its final weights, so
the tests can check what a user cares about: no sample seen twice, identical weights, one run directory,
logs written once, validation scalars averaged over ranks.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mlfab.testing import read_scalars

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Keep the caller's entries.

SCRIPT = """
import json, os, sys
import numpy as np
import torch
import yaml
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


def run_ddp(tmp_path: Path, script: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`python script *args` on a free port, in a process group of its own (which a test may signal as a whole)."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env_for(tmp_path, MASTER_PORT=str(free_port()), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


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
    args = ["accelerator=cpu", "devices=2", f"strategy={strategy}", f"compile={compile}"]
    args.append(f"run_dir={tmp_path / 'runs'}")
    proc = run_ddp(tmp_path, script, args, DATASET=dataset)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_two_ranks(tmp_path, proc.stdout)
    assert proc.stdout.count("torch.compile (torch's defaults): ") == (compile == "true")


def test_a_map_style_set_resumed_under_ddp_draws_the_uninterrupted_runs_batches(tmp_path: Path) -> None:
    """A fit stopped mid-epoch (here by max_steps) saved its epoch as done: the resumed run drew the rest of the epoch,
    and every epoch after, in the next epoch's order (other samples, some twice). Stopped twice, across an epoch's end
    (4 batches an epoch per rank)."""
    args = ["accelerator=cpu", "devices=2", "batch_size=32", "valid_every_n_steps=null"]
    steps: dict[str, list[Any]] = {}
    for name, stops in (("uninterrupted", [10]), ("resumed", [3, 6, 10])):
        (base := tmp_path / name).mkdir()
        script = write_script(base)
        for max_steps in stops:
            proc = run_ddp(base, script, [*args, f"max_steps={max_steps}", f"exp_dir={base / 'run'}"], DATASET="map")
            assert proc.returncode == 0, proc.stderr[-4000:]
        steps[name] = [read_rank(base, "train", rank) for rank in (0, 1)]
    assert [[step for step, _, _ in rank] for rank in steps["resumed"]] == [list(range(10))] * 2
    assert steps["resumed"] == steps["uninterrupted"]  # Each step's samples and loss, on each rank.


def test_two_simulated_nodes(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    port = str(free_port())
    (tmp := tmp_path / "tmp").mkdir()  # Where rank one holds a placeholder until it has rank zero's run directory.
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
            env=env_for(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), TMPDIR=str(tmp)),
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
    assert not list(tmp.glob("mlfab-rank-*")), "rank one left its placeholder run directory behind"


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The distributed script under `torchrun --nproc_per_node=2`, with `args`."""
    script = write_script(tmp_path)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    args = (str(script), "accelerator=cpu", *args, f"run_dir={tmp_path / 'runs'}")
    env = env_for(tmp_path)
    return subprocess.run([*run, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes(tmp_path: Path) -> None:
    proc = torchrun(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_two_ranks(tmp_path, proc.stdout)


OWN_TRAINER = """
import os
from pathlib import Path
import lightning.pytorch as pl
import torch
from mlfab.testing import BoringConfig, BoringTask
task = BoringTask(BoringConfig(max_steps=4))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, limit_val_batches=2,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
trainer.fit(task)
(result,) = trainer.validate(task, verbose=False)
Path(os.environ["OUT_DIR"], f"rank{trainer.global_rank}.txt").write_text(str(result["valid/loss/loss"]))
torch.distributed.destroy_process_group()  # As torch asks: without it, gloo's threads at exit could abort the process.
"""


def test_a_task_in_a_two_process_trainer_of_the_users_trains(tmp_path: Path) -> None:
    """It crashed in setup on every rank: `TypeError: expected str, bytes or os.PathLike object, not NoneType`."""
    script = tmp_path / "own_trainer.py"
    script.write_text(OWN_TRAINER)
    (tmp_path / "out").mkdir()
    proc = run_ddp(tmp_path, script, [])
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float((tmp_path / "out" / f"rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert losses[0] == losses[1]  # Validated on both ranks' batches: the mean over ranks, on each.


def start_ddp(tmp_path: Path, text: str, *args: str) -> subprocess.Popen[str]:
    """The script `text`, started on 2 CPU processes into `<tmp_path>/run`, in a process group of its own."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.Popen(
        [sys.executable, str(script), "accelerator=cpu", "devices=2", f"exp_dir={tmp_path / 'run'}", *args],
        env=env_for(tmp_path, MASTER_PORT=str(free_port())),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


UNEVEN_RANKS = """
import sys, time
from mlfab.testing import BoringConfig, BoringTask

class Uneven(BoringTask):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(0.2 if self.global_rank == 1 else 0.02)  # Rank one's steps end later, by its clock.

Uneven.launch(BoringConfig(max_steps=12, valid_every_n_steps=None), argv=sys.argv[1:])
"""


def test_a_cadence_in_seconds_under_ddp_is_decided_alike_on_every_rank(tmp_path: Path) -> None:
    """Each rank asked its own clock whether to validate: the ranks went into different collectives and hung for
    good (a SIGTERM did nothing)."""
    proc = start_ddp(tmp_path, UNEVEN_RANKS, "valid_every_n_seconds=0.3", "save_every_n_seconds=0.5")
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run hung") from None
    assert proc.returncode == 0, err[-4000:]
    assert "Finished at step 12/12" in out and out.count("[valid] step") >= 3


ONE_RANK_SIGNALLED = """
import os, sys, time
from mlfab.testing import BoringConfig, BoringTask

class Slow(BoringTask):
    def on_train_start(self):
        with open(f"{os.environ['OUT_DIR']}/pid{self.global_rank}", "w") as f:
            f.write(str(os.getpid()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(0.1)

Slow.launch(BoringConfig(max_steps=400, valid_every_n_steps=None), argv=sys.argv[1:])
"""


def test_a_signal_to_one_rank_stops_every_rank_and_is_said_with_its_exit_code(tmp_path: Path) -> None:
    """SIGTERM to rank one alone stopped the run without a word, with exit code 0 (rank zero had no signal)."""
    (tmp_path / "out").mkdir()
    proc = start_ddp(tmp_path, ONE_RANK_SIGNALLED)
    try:
        for _ in range(600):
            if (tmp_path / "out" / "pid1").exists():
                break
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(int((tmp_path / "out" / "pid1").read_text()), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    assert err.count("SIGTERM (to another rank): stopping after this step and saving a checkpoint.") == 1
    assert "stopped by SIGTERM: to go on from it, relaunch into this run" in out
    assert "Finished at step 400/400" not in out


def test_torchrun_with_a_config_of_another_shape_is_refused_before_any_run(tmp_path: Path) -> None:
    """`devices=4` under a torchrun of 2 processes would be dropped for torchrun's shape, config.yaml keeping it."""
    proc = torchrun(tmp_path, "devices=4")
    assert proc.returncode != 0
    refusal = "devices=4 disagrees with torchrun, which started 2 process(es) per node on 1 node(s)"
    assert proc.stderr.count(refusal) == 2
    assert not (tmp_path / "runs").exists()


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
import yaml
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
    proc = run_ddp(tmp_path, script, ["accelerator=cpu", "devices=2", f"run_dir={tmp_path / 'runs'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The two processes' lines may run together on the shared stdout: each record is matched on its own.
    assert sorted(re.findall(r"RANK (\d) skipped (\d) same (True|False)", proc.stdout)) == [
        ("0", "1", "True"),
        ("1", "1", "True"),
    ]
    assert "Step 1 skipped: loss on another process is not finite" in proc.stderr + proc.stdout


SPAWNED = """
import os, signal, sys
import mlfab
from mlfab.testing import BoringConfig, BoringTask

class Spawned(BoringTask):
    def set_loggers(self):
        self.add_logger(mlfab.StdoutLogger(), mlfab.JsonLogger(self.exp_dir))

    def get_loss(self, batch, state):
        if state.phase == "train" and state.num_steps == 2:
            if os.environ.get("AT_STEP_2") == "fail":  # On each rank: the launcher reports the first to end.
                raise RuntimeError("failed at step 2")
            if os.environ.get("AT_STEP_2") == "sigterm" and self.global_rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            if os.environ.get("AT_STEP_2") == "group-sigterm" and self.global_rank == 0:  # As Slurm and a terminal do.
                os.killpg(0, signal.SIGTERM)
            if os.environ.get("AT_STEP_2") == "launcher-sigterm" and self.global_rank == 0:  # `kill <its pid>`.
                os.kill(os.getppid(), signal.SIGTERM)
        return super().get_loss(batch, state)

if __name__ == "__main__":
    Spawned.launch(BoringConfig(max_steps=4, valid_every_n_steps=2), argv=sys.argv[1:])
"""


def run_spawned(tmp_path: Path, at_step_2: str = "") -> tuple[subprocess.CompletedProcess[str], Path]:
    """A `ddp_spawn` fit of 4 steps on 2 CPU processes, with a ModelCheckpoint that keeps the best validation loss."""
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED)
    exp_dir = tmp_path / "run"
    args = [
        "fit",
        f"--model.config.exp_dir={exp_dir}",
        "--model.config.accelerator=cpu",
        "--model.config.devices=2",
        "--model.config.strategy=ddp_spawn",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=valid/loss/loss",
    ]
    proc = run_ddp(tmp_path, script, args, AT_STEP_2=at_step_2)
    return proc, exp_dir


def launch_records(exp_dir: Path) -> tuple[int, int]:
    """The launch entries in launches.yaml and the "run" lines in the JSON log."""
    launches = yaml.safe_load((exp_dir / "provenance" / "launches.yaml").read_text())
    lines = [json.loads(line) for line in (exp_dir / "json" / "log.jsonl").read_text().splitlines()]
    return len(launches), sum(line["phase"] == "run" for line in lines)


def test_ddp_spawn_ends_with_the_runs_step_and_training_time_and_records_it_once(tmp_path: Path) -> None:
    """The processes Lightning spawns train on copies of the task and callbacks: the launching process's never trained
    (it said `Finished at step 0/4` after its own wall time, with no best checkpoint), and each spawned process's
    copy of the run wrote the launch's records."""
    proc, exp_dir = run_spawned(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    finish, *listed = lines[max(i for i, line in enumerate(lines) if line.startswith("Finished at step")) :]
    took = re.fullmatch(r"Finished at step 4/4 after 0:00:(\d\d) of training\. Run directory: (.*)", finish)
    assert took is not None and took[2] == str(exp_dir), finish
    last = torch.load(exp_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert last["mlfab"]["elapsed_time_s"] - 1 <= int(took[1]) <= last["mlfab"]["elapsed_time_s"] + 5
    assert len(listed) == 2 and listed[0] == f"  last checkpoint: {exp_dir / 'checkpoints' / 'last.ckpt'}", listed
    best = re.fullmatch(r"  best checkpoint \(valid/loss/loss=[0-9.e+-]+\): (.*\.ckpt)", listed[1])
    assert best is not None and Path(best[1]).is_file(), listed
    assert launch_records(exp_dir) == (1, 1)


def test_ddp_spawn_keeps_the_directory_of_a_run_that_failed_once_started(tmp_path: Path) -> None:
    """The launching process took the run as refused before it started (its records had not been written there) and
    removed its directory, with what the spawned processes had written in it."""
    proc, exp_dir = run_spawned(tmp_path, at_step_2="fail")
    assert proc.returncode != 0 and "failed at step 2" in proc.stderr
    assert (exp_dir / "config.yaml").is_file() and launch_records(exp_dir) == (1, 1)


@pytest.mark.parametrize("at_step_2", ["sigterm", "group-sigterm", "launcher-sigterm"])
def test_ddp_spawn_exits_with_the_signal_that_stopped_training(tmp_path: Path, at_step_2: str) -> None:
    """A SIGTERM to a spawned process stops training there (as under `ddp`); the launching process, whose callbacks
    got no signal, exited 0. One to the whole process group (Slurm's, a terminal's) or to the launching process alone
    ended the launching process at once (exit 1, no last lines), leaving the spawned ones without it."""
    proc, exp_dir = run_spawned(tmp_path, at_step_2=at_step_2)
    assert proc.returncode == 128 + 15, proc.stderr[-4000:]
    assert "Finished at step 3/4 after " in proc.stdout  # The step the signal came in (from 0) ended training.


def test_a_checkpoint_monitoring_a_training_metric_under_ddp_is_scored_with_the_mean_over_ranks(tmp_path: Path) -> None:
    """Training values reached Lightning on rank zero alone: its ModelCheckpoint waited forever for rank one's vote
    on whether to save, and rank one for rank zero."""
    script = write_script(tmp_path)
    args = [
        "fit",
        "--model.config.accelerator=cpu",
        "--model.config.devices=2",
        f"--model.config.run_dir={tmp_path / 'runs'}",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=train/loss/loss",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    proc = run_ddp(tmp_path, script, args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "runs" / "distributed").iterdir()
    losses = [read_rank(tmp_path, "train", r) for r in (0, 1)]
    for step in (2, 4, 6, 8):
        saved = torch.load(run / "checkpoints" / f"step={step}.ckpt", weights_only=False)
        (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
        per_rank = [loss for r in (0, 1) for s, _, loss in losses[r] if s == step - 1]
        assert len(per_rank) == 2
        assert float(state["current_score"]) == pytest.approx(np.mean(per_rank), rel=1e-5), step
