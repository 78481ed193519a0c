"""Periodic checkpoints written in a background thread (`async_checkpoints`, mlfab/run/async_save.py): what is written
is the state of the step it was saved at, however far training got meanwhile; a process killed mid-write leaves the
previous checkpoint; resume from one is exact; a failed write is raised, not lost; and the saves that must be on disk
(the final one, a task's own save hooks) are."""

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import mlfab
from mlfab import checkpoints
from mlfab.checkpoints import AtomicCheckpointIO, checksum_path, checksum_problem, file_sha256
from mlfab.errors import CheckpointError
from mlfab.run import async_save
from mlfab.run.async_save import BackgroundCheckpointIO
from mlfab.run.trainer import is_periodic
from mlfab.testing import BoringConfig, BoringTask

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
WRITER = "mlfab-checkpoint-writer"  # The background thread's name.


def periodic_io() -> BackgroundCheckpointIO:
    return BackgroundCheckpointIO(AtomicCheckpointIO(), background=is_periodic)  # As a run's Trainer has it.


def held(io: BackgroundCheckpointIO) -> threading.Event:
    """Holds `io`'s writes until the event returned is set."""
    release, write = threading.Event(), io.checkpoint_io.save_checkpoint

    def save(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        assert release.wait(30), "the test never released the write"
        write(checkpoint, path, storage_options)

    io.checkpoint_io.save_checkpoint = save  # type: ignore[method-assign]
    return release


def intact(path: Path) -> bool:
    """A checkpoint file with its checksum file beside it, matching."""
    return path.is_file() and checksum_path(path).is_file() and checksum_problem(path) is None


def same(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two loaded checkpoints (or parts) differ."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        ok = isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


# ---------------------------------------------------------------------------------------------------------------------
# The writer on its own.


@pytest.mark.unit
def test_background_write_has_the_checkpoint_as_it_was_at_the_save_call(tmp_path: Path) -> None:
    weight = torch.randn(6, 5)
    checkpoint = {
        "state_dict": {"w": weight, "tied": weight, "row": weight[2], "steps": torch.arange(4)},
        "optimizer_states": [{"state": {0: {"exp_avg": weight * 2}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "loops": {"progress": [1, 2]},
        "rng": ("MT19937", torch.arange(3), 1),
    }
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "sync" / "step_00000001.ckpt")
    io = periodic_io()
    release = held(io)
    start = time.perf_counter()
    io.save_checkpoint(checkpoint, tmp_path / "async" / "step_00000001.ckpt")
    assert time.perf_counter() - start < 5  # Returned with the write still held.
    assert not (tmp_path / "async" / "step_00000001.ckpt").exists()
    # What training does after the save call: in-place updates, new values in the same containers.
    weight.add_(1.0)
    checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].zero_()
    checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] = 0.5
    checkpoint["loops"]["progress"].append(3)
    release.set()
    io.teardown()

    written, expected = tmp_path / "async" / "step_00000001.ckpt", tmp_path / "sync" / "step_00000001.ckpt"
    assert written.read_bytes() == expected.read_bytes()  # The very bytes a synchronous save of that moment wrote.
    assert intact(written)
    assert checksum_path(written).read_text() == f"{file_sha256(written)}  {written.name}\n"
    loaded = torch.load(written, weights_only=True)
    assert not torch.equal(loaded["state_dict"]["w"], weight)  # The comparison can fail: training changed it.
    sd = loaded["state_dict"]
    assert sd["tied"].untyped_storage().data_ptr() == sd["w"].untyped_storage().data_ptr()  # Still shared.
    assert sd["row"].untyped_storage().data_ptr() == sd["w"].untyped_storage().data_ptr()


@pytest.mark.unit
def test_copies_made_for_a_save_are_written_as_they_are_and_their_memory_serves_the_next_save(tmp_path: Path) -> None:
    io = periodic_io()
    seen: list[dict[str, Any]] = []
    write = io.checkpoint_io.save_checkpoint

    def save(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        seen.append(checkpoint)
        write(checkpoint, path, storage_options)

    io.checkpoint_io.save_checkpoint = save  # type: ignore[method-assign]
    weight, moment = torch.randn(40, 30), torch.randn(40, 30)
    copy = io.staged_copies()
    assert copy is not None
    staged = copy(weight)  # As save_in_eval_mode collects the training weights.
    assert torch.equal(staged, weight) and staged.data_ptr() != weight.data_ptr()
    assert torch.equal(copy(weight[:, :3]), weight[:, :3])  # A view: copied as `clone` copies it.
    io.save_checkpoint({"w": staged, "m": moment}, tmp_path / "step_00000001.ckpt")
    weight.add_(1.0), moment.add_(1.0)  # Training goes on.
    copy = io.staged_copies()  # Waits for the write: its buffers are free again.
    assert copy is not None
    assert seen[0]["w"].data_ptr() == staged.data_ptr()  # Written from the staged copy, not copied again ...
    assert seen[0]["m"].data_ptr() != moment.data_ptr()  # ... and the rest copied.
    loaded = torch.load(tmp_path / "step_00000001.ckpt", weights_only=True)
    assert torch.equal(loaded["w"] + 1, weight) and torch.equal(loaded["m"] + 1, moment)
    first = {staged.data_ptr(), seen[0]["m"].data_ptr()}
    del staged
    again = copy(weight)
    assert again.data_ptr() in first  # The previous save's memory, reused.
    io.save_checkpoint({"w": again, "m": moment}, tmp_path / "step_00000002.ckpt")
    # A copy kept past its save (a callback holding on to the checkpoint's weights) is never overwritten.
    kept, before = again, again.clone()
    weight.add_(1.0)
    copy = io.staged_copies()
    assert copy is not None
    third = copy(weight)
    assert third.data_ptr() != kept.data_ptr() and torch.equal(kept, before) and torch.equal(third, weight)
    io.save_checkpoint({"w": third, "m": moment}, tmp_path / "step_00000003.ckpt")
    io.teardown()
    assert torch.equal(kept, before)
    loaded = torch.load(tmp_path / "step_00000002.ckpt", weights_only=True)
    assert torch.equal(loaded["w"], before) and torch.equal(loaded["m"], moment)
    assert intact(tmp_path / "step_00000002.ckpt") and intact(tmp_path / "step_00000003.ckpt")
    assert torch.equal(torch.load(tmp_path / "step_00000003.ckpt", weights_only=True)["w"], weight)


@pytest.mark.unit
def test_staging_counts_only_buffers_the_next_save_may_reuse_and_clones_what_it_cannot_stage() -> None:
    """The memory check before a background save counts the buffers it will reuse: not one whose copy a callback
    still holds. Tensors without plain strided storage (sparse) are cloned, not staged."""
    staging = async_save.Staging()
    weight = torch.randn(40, 30)
    kept = staging.copy(weight)
    sparse = torch.eye(4).to_sparse()
    cloned = staging.copy(sparse)
    assert torch.equal(cloned.to_dense(), sparse.to_dense()) and cloned.layout == torch.sparse_coo
    assert staging.reusable_bytes() == weight.nbytes  # During the save: the staged copy is this save's.
    staging.finish()
    assert staging.reusable_bytes() == 0  # Its copy is still alive: the next save takes new memory.
    del kept
    assert staging.reusable_bytes() == weight.nbytes


@pytest.mark.unit
def test_a_save_waits_for_the_write_before_it_and_other_saves_are_synchronous(tmp_path: Path) -> None:
    io = periodic_io()
    release = held(io)
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000001.ckpt")
    io.remove_checkpoint(tmp_path / "old.ckpt")  # Queued behind the write.
    done: list[float] = []
    final = threading.Thread(
        target=lambda: (io.save_checkpoint({"x": torch.zeros(3)}, tmp_path / "last.ckpt"), done.append(1))
    )
    final.start()
    final.join(0.5)
    assert final.is_alive() and not (tmp_path / "last.ckpt").exists()  # It waits for the write in flight.
    release.set()
    final.join(30)
    assert done and (tmp_path / "last.ckpt").is_file()  # On disk when the call returns.
    files = checkpoints.checkpoint_files(tmp_path)
    assert [p.name for p in files] == ["step_00000001.ckpt", "last.ckpt"]  # Oldest first: resume picks last.ckpt.
    io.teardown()


@pytest.mark.unit
def test_a_failed_background_write_is_raised_by_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = tmp_path / "checkpoints"
    io = periodic_io()
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000001.ckpt")
    io.wait()
    old = tmp_path / "step_00000001.ckpt"
    real_write = checkpoints.HashingWriter.write
    removal_queued = threading.Event()

    def write(self: Any, data: Any) -> int:
        if threading.current_thread().name == WRITER:
            assert removal_queued.wait(30)  # The removal comes while the write is in flight, as in training.
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(checkpoints.HashingWriter, "write", write)
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000002.ckpt")  # Fails in the background...
    io.remove_checkpoint(old)  # ...so this removal, queued behind it, never happens.
    removal_queued.set()
    deadline = time.monotonic() + 30
    while "could not be written in the background" not in capsys.readouterr().err:
        assert time.monotonic() < deadline, "the failure was not printed"
        time.sleep(0.01)
    monkeypatch.setattr(checkpoints.HashingWriter, "write", real_write)  # The failure was passing (an NFS hiccup).
    message = r"Could not write checkpoint .*step_00000002.ckpt: the disk is full\. Earlier checkpoints are intact"
    with pytest.raises(
        CheckpointError, match=message
    ) as raised:  # The next save is written first: nothing since is lost.
        io.save_checkpoint({"x": torch.full((3,), 3.0)}, tmp_path / "step_00000003.ckpt")
    notes = "".join(raised.value.__notes__)
    assert "written in the background" in notes and f"written to {tmp_path / 'step_00000003.ckpt'} first" in notes
    names = ["step_00000001.ckpt", "step_00000001.ckpt.sha256", "step_00000003.ckpt", "step_00000003.ckpt.sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert intact(old) and intact(tmp_path / "step_00000003.ckpt")
    assert torch.equal(torch.load(tmp_path / "step_00000003.ckpt")["x"], torch.full((3,), 3.0))
    io.teardown()  # Raised once.


@pytest.mark.unit
def test_a_failed_background_write_is_raised_at_teardown_or_printed_beside_another_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        raise CheckpointError(f"Could not write checkpoint {path}: the disk is full.")

    io = periodic_io()
    io.checkpoint_io.save_checkpoint = failing  # type: ignore[method-assign]
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000001.ckpt")
    with pytest.raises(CheckpointError, match="step_00000001.ckpt: the disk is full"):
        io.teardown()
    io.teardown()

    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000002.ckpt")
    try:
        raise KeyboardInterrupt  # The exception a Trainer tears down after (it goes on).
    except KeyboardInterrupt:
        io.teardown()
    assert "a checkpoint written in the background failed: Could not write checkpoint" in capsys.readouterr().err


@pytest.mark.unit
def test_a_copy_that_would_not_fit_in_memory_is_a_synchronous_save_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(async_save, "available_memory", lambda: 1000)
    io = periodic_io()
    held(io).set()
    io.save_checkpoint({"x": torch.ones(1000)}, tmp_path / "step_00000001.ckpt")
    assert (tmp_path / "step_00000001.ckpt").is_file()  # Written when the call returned.
    assert "step_00000001.ckpt is written synchronously" in capsys.readouterr().err


@pytest.mark.unit
def test_the_writer_pickles_for_ddp_spawn(tmp_path: Path) -> None:
    io = periodic_io()
    io.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000001.ckpt")
    copy = pickle.loads(pickle.dumps(io))  # Waits for the write first.
    copy.save_checkpoint({"x": torch.ones(3)}, tmp_path / "step_00000002.ckpt")
    copy.teardown()
    assert all(intact(tmp_path / f"step_0000000{i}.ckpt") for i in (1, 2))


@pytest.mark.unit
def test_saves_in_quick_succession_are_each_written_once_in_order(tmp_path: Path) -> None:
    io = periodic_io()
    written: list[str] = []
    write = io.checkpoint_io.save_checkpoint

    def save(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        written.append(Path(path).name)
        write(checkpoint, path, storage_options)

    io.checkpoint_io.save_checkpoint = save  # type: ignore[method-assign]
    names = [f"step_{i:08d}.ckpt" for i in range(1, 31)]
    for i, name in enumerate(names):
        io.save_checkpoint({"i": torch.full((100,), i)}, tmp_path / name)
        if i >= 2:
            io.remove_checkpoint(tmp_path / names[i - 2])  # As ModelCheckpoint(save_top_k=2) does.
    io.teardown()
    assert written == names
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == names[-2:]
    assert all(intact(p) for p in tmp_path.glob("*.ckpt"))
    assert torch.load(tmp_path / names[-1], weights_only=True)["i"][0] == 29


@pytest.mark.unit
def test_only_the_periodic_cadences_files_are_written_in_the_background() -> None:
    background = ["step_00000010.ckpt", "time_step_00000010.ckpt", "step_00000010-v1.ckpt"]
    at_once = ["last.ckpt", "signal_step_00000010.ckpt", "hpc_ckpt_1.ckpt", "epoch=0-step=10.ckpt", "step_10.pt"]
    assert [is_periodic(Path(n)) for n in background + at_once] == [True] * 3 + [False] * 5


# ---------------------------------------------------------------------------------------------------------------------
# In a run.


class Stepping(BoringTask):
    """Records the steps done and each training loss, by step."""

    steps: list[int] = []
    losses: dict[int, float] = {}

    def on_step_end(self, state: mlfab.State, loss_dict: dict[str, Tensor]) -> None:
        Stepping.steps.append(state.num_steps)

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            Stepping.losses[state.num_steps] = loss.item()
        return loss


def launch(tmp_path: Path, name: str, **config: Any) -> Path:
    settings = {"max_steps": 6, "save_every_n_steps": 2, "save_every_n_seconds": None, "valid_every_n_steps": None}
    settings.update(config)
    Stepping.steps, Stepping.losses = [], {}
    Stepping.launch(BoringConfig(exp_dir=str(tmp_path / name), **settings), argv=[])
    return tmp_path / name / "checkpoints"


def record_writes(monkeypatch: pytest.MonkeyPatch, hold_until_next_step: bool = False) -> list[dict[str, Any]]:
    """Records each checkpoint write (its file, its thread); with `hold_until_next_step`, a background write of a
    periodic checkpoint waits until training finished another step, noting whether the live weights then differ."""
    writes: list[dict[str, Any]] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def save(self: Any, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        step = checkpoint["global_step"]
        record = {"name": Path(path).name, "thread": threading.current_thread().name, "step": step}
        if hold_until_next_step and record["thread"] == WRITER and step < 6:
            deadline = time.monotonic() + 60
            while not Stepping.steps or max(Stepping.steps) <= step:
                assert time.monotonic() < deadline, f"training did not go on during the write of step {step}"
                time.sleep(0.005)
            record["steps_done_at_write"] = max(Stepping.steps)
        writes.append(record)
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    return writes


@pytest.mark.integration
def test_async_checkpoints_hold_their_steps_state_as_a_synchronous_run_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_dir = launch(tmp_path, "sync", async_checkpoints=False, keep_last_n_checkpoints=3)
    writes = record_writes(monkeypatch, hold_until_next_step=True)
    async_dir = launch(tmp_path, "async", keep_last_n_checkpoints=3)

    threads = {w["name"]: w["thread"] for w in writes}
    assert threads == {
        "step_00000002.ckpt": WRITER,
        "step_00000004.ckpt": WRITER,
        "step_00000006.ckpt": WRITER,
        "last.ckpt": "MainThread",
    }
    # Training went on past each step before its checkpoint was written.
    assert [w["steps_done_at_write"] > w["step"] for w in writes if "steps_done_at_write" in w] == [True, True]
    for name in ("step_00000002.ckpt", "step_00000004.ckpt", "step_00000006.ckpt", "last.ckpt"):
        assert intact(async_dir / name)
        a, s = (torch.load(d / name, weights_only=True) for d in (async_dir, sync_dir))
        assert a["global_step"] == (int(name[5:13]) if name.startswith("step_") else 6)
        differences = [d for key in ("state_dict", "optimizer_states", "loops", "global_step") for d in same(
            a[key], s[key], key)]  # fmt: skip
        for key in ("train_state_dict", "train_optimizer_states"):  # Schedule-free's training weights and state.
            differences += same(a["mlfab"][key], s["mlfab"][key], f"mlfab/{key}")
        assert differences == [], f"{name}: {differences}"
        assert same(a["state_dict"], a["mlfab"]["train_state_dict"]) != []  # Evaluation and training weights.
    two, last = (torch.load(async_dir / name, weights_only=True) for name in ("step_00000002.ckpt", "last.ckpt"))
    assert same(two["state_dict"], last["state_dict"]) != []  # The comparison can fail: the weights moved.


@pytest.mark.integration
def test_resume_from_an_async_checkpoint_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch(tmp_path, "reference", max_steps=8, save_every_n_steps=4)
    reference = dict(Stepping.losses)
    writes = record_writes(monkeypatch)
    ckpts = launch(tmp_path, "run", max_steps=6, save_every_n_steps=4)
    assert {w["name"]: w["thread"] for w in writes}["step_00000004.ckpt"] == WRITER
    for p in (ckpts / "last.ckpt", checksum_path(ckpts / "last.ckpt")):
        p.unlink()  # As if killed after step 6: the newest checkpoint is the one written in the background.
    launch(tmp_path, "run", max_steps=8, save_every_n_steps=4)
    resumed = dict(Stepping.losses)
    assert sorted(resumed) == [4, 5, 6, 7]  # Resumed at step 4.
    assert resumed == {step: reference[step] for step in (4, 5, 6, 7)}


@pytest.mark.integration
def test_a_task_with_its_own_save_hooks_saves_synchronously(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[str, bool, bool]] = []

    class Hooked(Stepping):
        def on_after_save_ckpt(self, ckpt_path: Path) -> None:
            seen.append((ckpt_path.name, ckpt_path.is_file(), intact(ckpt_path)))

    writes = record_writes(monkeypatch)
    Hooked.launch(BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=4, save_every_n_steps=2,
                               save_every_n_seconds=None, valid_every_n_steps=None), argv=[])  # fmt: skip
    assert seen == [(name, True, True) for name in ("step_00000002.ckpt", "step_00000004.ckpt", "last.ckpt")]
    assert {w["thread"] for w in writes} == {"MainThread"}
    assert "Hooked overrides on_before_save_ckpt / on_after_save_ckpt" in capsys.readouterr().err


@pytest.mark.integration
def test_a_logger_that_uploads_checkpoints_gets_synchronous_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Lightning logger with `log_model` (W&B, MLflow) uploads each file right after its save call: a background
    write would not be there yet."""
    from lightning.pytorch.loggers import CSVLogger

    from mlfab.run.trainer import build_trainer

    class Uploading(CSVLogger):
        _log_model = "all"  # What WandbLogger(log_model="all") keeps (tests/test_lightning_private.py).

    writes = record_writes(monkeypatch)
    config = BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=4, save_every_n_steps=2,
                          save_every_n_seconds=None, valid_every_n_steps=None)  # fmt: skip
    trainer = build_trainer(config, tmp_path / "run", [Uploading(tmp_path / "csv")], [])
    trainer.fit(BoringTask(config))
    assert [w["name"] for w in writes] == ["step_00000002.ckpt", "step_00000004.ckpt", "last.ckpt"]
    assert {w["thread"] for w in writes} == {"MainThread"}
    assert "Uploading uploads each checkpoint (log_model) as soon as it is saved" in capsys.readouterr().err


FAILING_SCRIPT = """
import errno, threading
from mlfab import checkpoints
from mlfab.testing import BoringConfig, BoringTask

real_write = checkpoints.HashingWriter.write
def write(self, data):
    if threading.current_thread().name == "mlfab-checkpoint-writer":
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, data)
checkpoints.HashingWriter.write = write

BoringTask.launch(BoringConfig(valid_every_n_steps=None, save_every_n_seconds=None))  # A program: its command line.
"""


@pytest.mark.integration
def test_a_failed_background_write_stops_the_run_with_the_error(tmp_path: Path) -> None:
    script = tmp_path / "failing.py"
    script.write_text(FAILING_SCRIPT)
    args = [sys.executable, str(script), "max_steps=6", "save_every_n_steps=2", f"exp_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # No hang.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "step_00000002.ckpt could not be written in the background" in proc.stderr
    assert "error: Could not write checkpoint" in proc.stderr and "step_00000002.ckpt: the disk is full" in proc.stderr
    # The next save, written at once, kept the training since; nothing half-written left.
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004.ckpt", "step_00000004.ckpt.sha256"]
    assert f"written to {ckpts / 'step_00000004.ckpt'} first: relaunch to go on from it" in proc.stderr
    assert "Finished at step" not in proc.stdout
    resumed = subprocess.run([*args[:2], "max_steps=6", "save_every_n_steps=100", f"exp_dir={tmp_path / 'run'}"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {ckpts / 'step_00000004.ckpt'}" in resumed.stdout + resumed.stderr


# A task that records its steps and, with SLOW_WRITE=N, writes its Nth checkpoint slowly (a slow disk): it creates
# WRITING when that write has begun.
KILLED_SCRIPT = """
import os, sys, time, json
from pathlib import Path
from mlfab import checkpoints
from mlfab.testing import BoringConfig, BoringTask

slow = int(os.environ.get("SLOW_WRITE", "0"))
saves = {"n": 0}
real_save = checkpoints.AtomicCheckpointIO.save_checkpoint
def save(self, checkpoint, path, storage_options=None):
    saves["n"] += 1
    return real_save(self, checkpoint, path, storage_options)
checkpoints.AtomicCheckpointIO.save_checkpoint = save

real_write = checkpoints.HashingWriter.write
def write(self, data):
    if saves["n"] == slow and self.written > 0:
        Path(os.environ["WRITING"]).touch()
        time.sleep(0.2)
    return real_write(self, data)
checkpoints.HashingWriter.write = write

class Logged(BoringTask):
    def on_step_end(self, state, loss_dict):
        with open(os.environ["STEPS"], "a") as f:
            f.write(json.dumps(state.num_steps) + "\\n")

Logged.launch(BoringConfig(in_dim=20000, valid_every_n_steps=None, save_every_n_seconds=None), argv=sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_during_a_background_write_keeps_the_previous_checkpoint_and_resumes_from_it(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    steps, writing, ckpts = tmp_path / "steps.jsonl", tmp_path / "writing", tmp_path / "run" / "checkpoints"
    args = [sys.executable, str(script), "max_steps=12", "save_every_n_steps=4", f"exp_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "STEPS": str(steps), "WRITING": str(writing)}
    proc = subprocess.Popen([*args], env={**env, "SLOW_WRITE": "2"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # The write of step 8 has begun, and training went on past step 8 meanwhile: kill it then.
        while not (writing.exists() and steps.exists() and max(map(int, steps.read_text().split())) > 8):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the slow write or the steps after it never came"
            time.sleep(0.01)
        assert list(ckpts.glob(".step_00000008.ckpt.*.tmp"))  # Mid-write.
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))
    assert names == ["step_00000004.ckpt", "step_00000004.ckpt.sha256"]
    assert intact(ckpts / "step_00000004.ckpt")
    assert torch.load(ckpts / "step_00000004.ckpt", weights_only=True)["global_step"] == 4

    steps.unlink()
    relaunch = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"Resuming from {ckpts / 'step_00000004.ckpt'}" in relaunch.stdout
    assert [int(s) for s in steps.read_text().split()] == list(range(5, 13))
    assert not list(ckpts.glob(".*.tmp"))  # The killed write's temporary file was removed.
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_a_background_write_saves_after_it_and_both_are_complete(tmp_path: Path, signum: int) -> None:
    script = tmp_path / "signalled.py"
    script.write_text(KILLED_SCRIPT)
    steps, writing, ckpts = tmp_path / "steps.jsonl", tmp_path / "writing", tmp_path / "run" / "checkpoints"
    args = [sys.executable, str(script), "max_steps=12", "save_every_n_steps=4", "keep_last_n_checkpoints=3",
            f"exp_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "STEPS": str(steps), "WRITING": str(writing), "SLOW_WRITE": "1"}
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (writing.exists() and steps.exists() and max(map(int, steps.read_text().split())) > 4):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the slow write or the steps after it never came"
            time.sleep(0.01)
        assert list(ckpts.glob(".step_00000004.ckpt.*.tmp"))  # The periodic checkpoint is being written.
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (143 if signum == signal.SIGTERM else 0), err[-3000:]
    saved = "last.ckpt" if signum == signal.SIGTERM else next(p.name for p in ckpts.glob("signal_step_*.ckpt"))
    assert not list(ckpts.glob(".*.tmp"))
    for name in ("step_00000004.ckpt", saved):
        assert intact(ckpts / name)
        torch.load(ckpts / name, weights_only=True)
    # Written after the periodic checkpoint it waited for: the one a relaunch resumes from.
    assert (ckpts / "step_00000004.ckpt").stat().st_mtime_ns < (ckpts / saved).stat().st_mtime_ns
    assert torch.load(ckpts / saved, weights_only=True)["global_step"] > 4


DDP_SCRIPT = """
import os, sys, time
from mlfab import checkpoints
from mlfab.testing import BoringConfig, BoringTask

real_write = checkpoints.HashingWriter.write
def write(self, data):  # A slow disk: each write lasts beyond the next save, which waits for it.
    time.sleep(0.05)
    return real_write(self, data)
checkpoints.HashingWriter.write = write

BoringTask.launch(BoringConfig(valid_every_n_steps=None, save_every_n_seconds=None), argv=sys.argv[1:])
"""


@pytest.mark.slow
def test_ddp_with_background_writes_finishes_with_every_checkpoint_intact(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    args = [sys.executable, str(script), "accelerator=cpu", "devices=2", "max_steps=8", "save_every_n_steps=1",
            "keep_last_n_checkpoints=3", f"exp_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "MASTER_PORT": str(port)}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert names == ["last.ckpt", "step_00000006.ckpt", "step_00000007.ckpt", "step_00000008.ckpt"]
    for name in names:
        assert intact(ckpts / name)
        step = 8 if name == "last.ckpt" else int(name[5:13])
        assert torch.load(ckpts / name, weights_only=True)["global_step"] == step
