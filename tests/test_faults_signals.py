"""Signals sent to the whole process group, as Slurm, Kubernetes and a terminal send them: the dataloader workers get
them too, and must leave them to the main process, which stops (or saves) at a step boundary.

Each run is a subprocess in a session of its own (`start_new_session=True`), so `os.killpg` reaches it, its
dataloader workers and its DDP ranks, and nothing else. The task is tests/test_resume.py's (it records every step's
loss), paused inside step `PAUSE_AT` until its own handler has seen the test's signal, so the signal arrives at a known
step with every worker (training and validation) running.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_resume import PYTHONPATH, SCRIPT, read_losses

pytestmark = pytest.mark.slow  # Several subprocesses each, with dataloader workers.

PAUSED = """
import os, sys, time
from mlfab.run.callbacks import GracefulStop
from mlfab.testing import BoringConfig
from recorded import Recorded  # tests/test_resume.py's task: it appends every training step's loss to LOSS_FILE.

class Paused(Recorded):
    def get_loss(self, batch, state):
        if self.trainer.world_size > 1:  # A loss file per rank.
            os.environ["LOSS_FILE"] = f"{os.environ['LOSSES']}.rank{self.global_rank}"
        loss = super().get_loss(batch, state)
        if state.phase == "train" and state.num_steps == int(os.environ.get("PAUSE_AT", "-1")):
            # Tell the test that this step has begun, then wait in it until the test's signal has reached this process
            # (or, with PAUSE_S, for that many seconds, as a long step would).
            stop = next(c for c in self.trainer.callbacks if isinstance(c, GracefulStop))
            with open(f"{os.environ['READY']}.{self.global_rank}", "w") as f:
                f.write(str(os.getpid()))
            wait_s = os.environ.get("PAUSE_S")
            deadline = time.monotonic() + float(wait_s or 60)
            while time.monotonic() < deadline and (wait_s or stop.signal_received is None and not stop._save_requested):
                time.sleep(0.01)
        return loss

if __name__ == "__main__":
    Paused.launch(BoringConfig(), argv=sys.argv[1:])
"""

COMMON = [
    "max_steps=40",
    "batch_size=4",
    "valid_every_n_steps=15",
    "save_every_n_steps=10",
    "save_every_n_seconds=null",
]
PAUSE_AT = 23  # After the validation of step 15: the validation loader's workers are running too.


class Run:
    """One launch of the paused task in a new session; `wait` checks that it left no process behind."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        losses: Path,
        *args: str,
        pause_at: int | None = None,
        script_text: str = PAUSED,
        **env: str,
    ) -> None:
        (tmp_path / "recorded.py").write_text(SCRIPT)
        script = tmp_path / f"{name}.py"
        script.write_text(script_text)
        self.ready = tmp_path / f"{name}.ready"
        self.log = tmp_path / f"{name}.log"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},  # SIGUSR1 would requeue a Slurm job.
            "PYTHONPATH": PYTHONPATH,
            "MLFABRC_PATH": str(tmp_path / "home" / ".mlfab.yml"),
            "LOSSES": str(losses),
            "LOSS_FILE": str(losses),
            "READY": str(self.ready),
            **env,
        }
        if pause_at is not None:
            full_env["PAUSE_AT"] = str(pause_at)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                env=full_env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Its own process group, as a job under Slurm, Kubernetes or a shell.
            )

    def wait_until_paused(self, ranks: int = 1, timeout: float = 120) -> list[int]:
        """The pids of the ranks, once each is paused in step PAUSE_AT."""
        deadline = time.monotonic() + timeout
        files = [Path(f"{self.ready}.{rank}") for rank in range(ranks)]
        while not all(f.exists() and f.read_text() for f in files):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the run did not reach step {PAUSE_AT}:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        return [int(f.read_text()) for f in files]

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)  # The session leader's pid is the group's id.

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.output()[-4000:]}") from None
        deadline = time.monotonic() + 15  # Workers the main process stopped may take a moment to be reaped.
        while group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                left = group_members(self.proc.pid)
                self.kill()
                raise AssertionError(f"processes of the run were left behind: {left}\n{self.output()[-4000:]}")
            time.sleep(0.1)
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return bool(group_members(pgid))  # Zombies still count for killpg; they are gone for this check.


def processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # It ended meanwhile.
            continue
        found.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return found


def group_members(pgid: int) -> list[int]:
    return sorted(pid for pid, state, _, group in processes() if group == pgid and state != "Z")


def children(parent: int) -> list[int]:
    return sorted(pid for pid, state, ppid, _ in processes() if ppid == parent and state != "Z")


def rank_losses(losses: Path, ranks: int) -> list[dict[int, float]]:
    """Every step's loss, for each rank (a resumed run's replace those of the steps after its checkpoint)."""
    return [read_losses(Path(f"{losses}.rank{rank}") if ranks > 1 else losses) for rank in range(ranks)]


_references: dict[tuple[str, ...], list[dict[int, float]]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, *args: str, ranks: int = 1) -> list[dict[int, float]]:
    """Every step's loss of the uninterrupted run, for each rank (computed once per set of arguments)."""
    if args not in _references:
        tmp = tmp_path_factory.mktemp("reference")
        losses = tmp / "losses.jsonl"
        run = Run(tmp, "reference", losses, *args, f"exp_dir={tmp / 'run'}")
        assert run.wait() == 0, run.output()[-4000:]
        _references[args] = rank_losses(losses, ranks)
    return _references[args]


def interrupt_and_resume(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, signum: int, *args: str, ranks: int = 1
) -> Run:
    """Runs to step PAUSE_AT, signals the whole group there, checks the checkpoint and the exit code, resumes to the end
    and checks that every rank's every step has the uninterrupted run's loss; returns the interrupted run."""
    args = (*COMMON, *args)
    expected = reference(tmp_path_factory, *args, ranks=ranks)
    losses = tmp_path / "losses.jsonl"
    exp_dir = f"exp_dir={tmp_path / 'run'}"
    first = Run(tmp_path, "first", losses, *args, exp_dir, pause_at=PAUSE_AT)
    first.wait_until_paused(ranks)
    first.signal_group(signum)
    assert first.wait() == 128 + signum, first.output()[-4000:]
    assert "is killed by signal" not in first.output() and "exited unexpectedly" not in first.output()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == PAUSE_AT + 1  # At the end of the step it was in.
    assert [max(steps) for steps in rank_losses(losses, ranks)] == [PAUSE_AT] * ranks

    second = Run(tmp_path, "second", losses, *args, exp_dir)
    assert second.wait() == 0, second.output()[-4000:]
    for rank, (want, got) in enumerate(zip(expected, rank_losses(losses, ranks), strict=True)):
        assert sorted(got) == list(range(40))
        for step in range(40):  # The steps before the signal too: the reference is the right one to compare with.
            assert got[step] == want[step], f"rank {rank}, step {step}: {got[step]} != {want[step]}"
    return first


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, workers: int
) -> None:
    first = interrupt_and_resume(tmp_path, tmp_path_factory, signal.SIGTERM, f"num_dataloader_workers={workers}")
    assert "SIGTERM: stopping after this step" in first.output()
    assert (
        f"stopped by SIGTERM: to go on from it, relaunch into this run (exp_dir={tmp_path / 'run'}," in first.output()
    )


def test_ctrl_c_in_a_terminal_stops_cleanly_and_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A terminal sends Ctrl-C's SIGINT to the foreground process group: the run and its workers."""
    first = interrupt_and_resume(tmp_path, tmp_path_factory, signal.SIGINT, "num_dataloader_workers=2")
    assert "SIGINT: stopping after this step" in first.output()
    assert "KeyboardInterrupt" not in first.output() and "Traceback" not in first.output()


def test_sigusr1_to_the_process_group_saves_and_training_goes_on(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    args = (*COMMON, "num_dataloader_workers=2")
    (expected,) = reference(tmp_path_factory, *args)
    losses = tmp_path / "losses.jsonl"
    exp_dir = tmp_path / "run"
    run = Run(tmp_path, "usr1", losses, *args, f"exp_dir={exp_dir}", pause_at=PAUSE_AT)
    run.wait_until_paused()
    run.signal_group(signal.SIGUSR1)
    assert run.wait() == 0, run.output()[-4000:]  # Not in a Slurm job: nothing requeues it, so it trains on.
    assert "SIGUSR1: saved checkpoint" in run.output()
    assert read_losses(losses) == expected  # Saving at the signal changed nothing in the run.
    saved = exp_dir / "checkpoints" / f"signal_step_{PAUSE_AT + 1:08d}.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == PAUSE_AT + 1

    # The signal's checkpoint resumes exactly: keep only it and relaunch into the run directory.
    for ckpt in (exp_dir / "checkpoints").iterdir():
        if ckpt != saved:
            ckpt.unlink()
    resumed = tmp_path / "resumed.jsonl"
    again = Run(tmp_path, "again", resumed, *args, f"exp_dir={exp_dir}")
    assert again.wait() == 0, again.output()[-4000:]
    got = read_losses(resumed)
    assert sorted(got) == list(range(PAUSE_AT + 1, 40))
    assert got == {s: expected[s] for s in got}


def test_a_worker_killed_for_real_is_still_an_error(tmp_path: Path) -> None:
    """Workers ignore the group's signals, but a worker that dies (here of SIGKILL) still fails the run, at once."""
    args = (*COMMON, "num_dataloader_workers=2", f"exp_dir={tmp_path / 'run'}")
    run = Run(tmp_path, "killed", tmp_path / "losses.jsonl", *args, pause_at=PAUSE_AT)
    (pid,) = run.wait_until_paused()
    workers = children(pid)
    assert len(workers) >= 2, workers  # The training loader's workers, and the validation loader's.
    os.kill(workers[0], signal.SIGKILL)
    code = run.wait(timeout=60)
    assert code not in (0, 128 + signal.SIGTERM), run.output()[-4000:]
    killed = f"DataLoader worker (pid {workers[0]}) is killed by signal: Killed"
    assert killed in run.output() or f"DataLoader worker (pid(s) {workers[0]}) exited unexpectedly" in run.output()
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_second_ctrl_c_aborts_at_once_without_leaving_workers(tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        "abort",
        tmp_path / "losses.jsonl",
        *COMMON,
        "num_dataloader_workers=2",
        f"exp_dir={tmp_path / 'run'}",
        pause_at=PAUSE_AT,
        PAUSE_S="30",  # After the first Ctrl-C the step waits on (as a long step would) for the second.
    )
    run.wait_until_paused()
    run.signal_group(signal.SIGINT)
    time.sleep(1.0)
    run.signal_group(signal.SIGINT)
    started = time.monotonic()
    code = run.wait(timeout=60)  # Also: no worker left behind.
    assert code != 0 and time.monotonic() - started < 20, run.output()[-4000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # Aborted: nothing saved.


def test_sigterm_to_a_ddp_process_group_checkpoints_and_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two CPU ranks (gloo) with two dataloader workers each: both ranks get the signal and stop at the same step."""
    ddp = ("accelerator=cpu", "devices=2", "strategy=ddp", "num_dataloader_workers=2")
    first = interrupt_and_resume(tmp_path, tmp_path_factory, signal.SIGTERM, *ddp, ranks=2)
    assert first.output().count("SIGTERM: stopping after this step") == 1  # Said by rank zero (each rank got it).


STUCK = """
import sys, time
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset

class Stuck(RegressionDataset):
    calls = 0

    def next(self):
        self.calls += 1
        if self.calls > 40:  # After 5 batches of 8, a worker's reads hang (a dead file server).
            time.sleep(300)
        return super().next()

class FailsAtEight(BoringTask):
    def get_dataset(self, phase):
        return Stuck(self.config.in_dim)

    def get_loss(self, batch, state):
        if state.phase == "train" and state.num_steps == 8:  # Batch 10, worker 0's sixth, was asked for: it hangs.
            time.sleep(0.5)
            raise ValueError("boom")
        return super().get_loss(batch, state)

if __name__ == "__main__":
    FailsAtEight.launch(BoringConfig(), argv=sys.argv[1:])
"""


def test_workers_stuck_in_the_dataset_still_end_with_the_run(tmp_path: Path) -> None:
    """Workers ignore SIGTERM from anyone but their parent: the main process ends stuck workers with SIGTERM (torch's
    shutdown, multiprocessing's at exit). Ignoring every SIGTERM would leave this run hanging at exit."""
    args = ("num_dataloader_workers=2", f"exp_dir={tmp_path / 'run'}")
    run = Run(tmp_path, "stuck", tmp_path / "losses.jsonl", *args, script_text=STUCK)
    assert run.wait(timeout=60) == 1  # And no worker is left behind.
    assert "ValueError: boom" in run.output()
