"""Checkpoint hygiene: temporary files of killed saves removed, keep_last_n_checkpoints honoured across resumes,
a checksum beside every checkpoint (a damaged newest one is skipped when resuming, refused when given), a full disk
explained, and a missing or garbage checkpoint named."""

import errno
import inspect
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mlfab
from mlfab import checkpoints
from mlfab.checkpoints import AtomicCheckpointIO, check_ckpt_path, checksum_path, damage, unreadable
from mlfab.cli import parser as cli_parser
from mlfab.run.rundir import newest_checkpoint, run_dirs_held
from mlfab.testing import BoringConfig, BoringTask, read_scalars

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
# Whether the command line checks --ckpt_path before the run starts (`check_ckpt_path` in mlfab/cli/parser.py).
PARSER_CHECKS_CKPT_PATH = "check_ckpt_path" in inspect.getsource(cli_parser)


def launch(exp_dir: Path, *argv: str, **overrides: object) -> None:
    config = BoringConfig(
        exp_dir=str(exp_dir), max_steps=6, save_every_n_steps=2, save_every_n_seconds=None, valid_every_n_steps=None
    )
    BoringTask.launch(config, argv=[*argv, *(f"{k}={'null' if v is None else v}" for k, v in overrides.items())])


def names(ckpt_dir: Path, pattern: str = "*") -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob(pattern))


def flip_a_weight(path: Path) -> None:
    """Flips the top exponent bit of the first float of `layer.weight`'s stored bytes, in place: the file still
    loads, with a huge weight."""
    weight = torch.load(path, weights_only=True)["state_dict"]["layer.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at >= 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------------------
# keep_last_n_checkpoints across resumes.


@pytest.mark.integration
def test_keep_last_is_honoured_across_resumes(tmp_path: Path) -> None:
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # A step and a time cadence (every step): each keeps its newest 2, whatever the launch that wrote them.
    both = {"save_every_n_seconds": 1e-9, "keep_last_n_checkpoints": 2}
    launch(run, **both)
    assert names(ckpts, "step_*.ckpt") == ["step_00000004.ckpt", "step_00000006.ckpt"]
    assert names(ckpts, "time_step_*.ckpt") == ["time_step_00000005.ckpt", "time_step_00000006.ckpt"]
    (ckpts / "last.ckpt").unlink()  # As after `kill -9`: the relaunch resumes from a periodic checkpoint.
    launch(run, max_steps=12, **both)
    # Lightning kept the checkpoint it resumed from (time_step_6) for good, and counted only its own files.
    assert names(ckpts, "*step_*.ckpt") == [
        "step_00000010.ckpt",
        "step_00000012.ckpt",
        "time_step_00000011.ckpt",
        "time_step_00000012.ckpt",
    ]
    launch(run, max_steps=16, save_every_n_steps=4, **both)  # A changed cadence: Lightning's state is not reloaded.
    assert names(ckpts, "step_*.ckpt") == ["step_00000012.ckpt", "step_00000016.ckpt"]
    assert names(ckpts, "time_step_*.ckpt") == ["time_step_00000015.ckpt", "time_step_00000016.ckpt"]
    launch(run, max_steps=24, save_every_n_steps=4, save_every_n_seconds=None, keep_last_n_checkpoints=2)
    assert names(ckpts, "step_*.ckpt") == ["step_00000020.ckpt", "step_00000024.ckpt"]
    assert names(ckpts, "time_step_*.ckpt") == ["time_step_00000015.ckpt", "time_step_00000016.ckpt"]  # Not its own.
    assert not names(ckpts, "*-v*")  # No versioned duplicates.
    # Every checkpoint has its checksum beside it, and no checksum outlives its checkpoint.
    assert {p.name + ".sha256" for p in ckpts.glob("*.ckpt")} == set(names(ckpts, "*.sha256"))
    assert all(damage(p) is None for p in ckpts.glob("*.ckpt"))


@pytest.mark.integration
def test_fewer_kept_checkpoints_on_relaunch(tmp_path: Path) -> None:
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    launch(run, max_steps=4, keep_last_n_checkpoints=3)
    launch(run, max_steps=8, keep_last_n_checkpoints=1)
    assert names(ckpts, "step_*.ckpt") == ["step_00000008.ckpt"]


# ---------------------------------------------------------------------------------------------------------------------
# Checksums.


@pytest.mark.integration
def test_flipped_bytes_are_skipped_on_resume_and_refused_when_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    launch(run)
    last = run / "checkpoints" / "last.ckpt"
    assert checksum_path(last).read_text().split() == [checkpoints.file_sha256(last), "last.ckpt"]  # sha256sum -c
    flip_a_weight(last)
    # The hazard: torch loads the damaged file without a word.
    assert torch.load(last, weights_only=True)["state_dict"]["layer.weight"].abs().max() > 1e30

    with pytest.raises(mlfab.CheckpointError, match=rf"{re.escape(str(last))} is corrupt or truncated: its sha256"):
        launch(tmp_path / "other", "fit", f"--ckpt_path={last}")
    capsys.readouterr()
    with pytest.raises(
        mlfab.CheckpointError, match=rf"{re.escape(str(last))} is corrupt or truncated: its sha256"
    ) as e:
        BoringTask.load_from_checkpoint(last)  # For inference, as the README shows: it loaded the damaged weights.
    assert str(e.value).endswith("Load another one.")  # No advice in a resume's terms (--ckpt_path, a relaunch).
    with pytest.raises(TypeError, match="class"):  # Still Lightning's guard against a call on an instance.
        BoringTask(BoringConfig()).load_from_checkpoint(run / "checkpoints" / "step_00000006.ckpt")
    assert BoringTask.load_from_checkpoint(str(run / "checkpoints" / "step_00000006.ckpt")).weights_step == 6

    launch(run, max_steps=8)
    err = capsys.readouterr().err
    good = run / "checkpoints" / "step_00000006.ckpt"
    assert err.count(f"Checkpoint {last} (its sha256 is") == 1  # Said once (it was said at parsing and at the start).
    assert f"is corrupt or truncated: using {good}, the newest intact checkpoint" in err
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 8 and resumed["state_dict"]["layer.weight"].abs().max() < 100
    assert damage(last) is None  # Replaced by the resumed run's final checkpoint, with its own checksum.


@pytest.mark.integration
def test_checkpoint_without_checksum_still_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    launch(run)
    last = run / "checkpoints" / "last.ckpt"
    for p in (run / "checkpoints").glob("*.sha256"):
        p.unlink()  # As an older mlfab left them.
    assert newest_checkpoint(run) == last
    launch(run, max_steps=8)
    out = capsys.readouterr()
    assert f"Resuming from {last}" in out.out and "corrupt" not in out.err
    assert torch.load(last, weights_only=True)["global_step"] == 8


@pytest.mark.integration
def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch(run, max_steps=2)
    files = sorted((run / "checkpoints").glob("*.ckpt"))
    for p in files:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(mlfab.CheckpointError, match=r"No intact checkpoint in .*checkpoints to resume from") as e:
        launch(run, max_steps=4)
    assert all(str(p) in str(e.value) for p in files)


@pytest.mark.unit
def test_random_bytes_are_corrupt_not_an_unsafe_object(tmp_path: Path) -> None:
    garbage = tmp_path / "checkpoints" / "last.ckpt"
    garbage.parent.mkdir()
    garbage.write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(mlfab.CheckpointError) as e:
        AtomicCheckpointIO().load_checkpoint(garbage)
    message = str(e.value)
    assert f"Checkpoint {garbage} is corrupt or truncated" in message and "not a complete torch zip file" in message
    assert "namedtuple" not in message and "weights_only" not in message
    # What torch says about it is the "weights only" refusal that the namedtuple explanation is for.
    try:
        torch.load(garbage, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch raises is classified.
        assert "weights only load failed" in str(error).lower()
        assert "is corrupt or truncated" in str(unreadable(garbage, error))
    assert damage(garbage) is not None
    with pytest.raises(
        mlfab.CheckpointError, match=r"(?s)No intact checkpoint .*last.ckpt: it is not a complete torch"
    ):
        newest_checkpoint(tmp_path)


@pytest.mark.integration
@pytest.mark.skipif(not PARSER_CHECKS_CKPT_PATH, reason="mlfab/cli/parser.py does not call check_ckpt_path yet")
def test_random_bytes_given_as_ckpt_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(mlfab.CheckpointError, match=rf"{re.escape(str(garbage))} is corrupt or truncated"):
        launch(tmp_path / "run", "fit", f"--ckpt_path={garbage}")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --ckpt_path to a missing file.


@pytest.mark.unit
def test_missing_ckpt_path_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(mlfab.CheckpointError, match=r"--ckpt_path .*/lats.ckpt: no such checkpoint file\. .*last.ckpt"):
        check_ckpt_path(tmp_path / "checkpoints" / "lats.ckpt")
    with pytest.raises(mlfab.CheckpointError, match=r"--ckpt_path .* is a directory, not a checkpoint file"):
        check_ckpt_path(tmp_path)


@pytest.mark.integration
@pytest.mark.skipif(not PARSER_CHECKS_CKPT_PATH, reason="mlfab/cli/parser.py does not call check_ckpt_path yet")
def test_missing_ckpt_path_stops_before_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(mlfab.CheckpointError, match=rf"--ckpt_path {re.escape(str(missing))}: no such checkpoint"):
        launch(tmp_path / "run", "fit", f"--ckpt_path={missing}")
    assert not (tmp_path / "run").exists()
    assert "Resuming from" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# A full disk.


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.mark.integration
def test_full_disk_says_how_much_is_needed_and_free(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    mount_tmpfs(ckpts, "768k")  # One checkpoint of the 10000-input model (~0.5 MB with its batch) fits, not two.
    try:
        with pytest.raises(mlfab.CheckpointError) as e:
            launch(run, in_dim=10_000)
        message = str(e.value)
        found = re.search(
            r"Could not write checkpoint .*step_00000004.ckpt: the disk is full\. Earlier checkpoints are intact: "
            r"step_00000002.ckpt\. The checkpoint needs about (\d+\.\d) kB and (\d+\.\d) kB are free on the disk of ",
            message,
        )
        assert found, message
        size = (ckpts / "step_00000002.ckpt").stat().st_size / 1000  # The failed one is as big as this one.
        needed, free = float(found.group(1)), float(found.group(2))
        assert 0.9 * size < needed < 1.1 * size and free < needed, message
        assert names(ckpts) == ["step_00000002.ckpt", "step_00000002.ckpt.sha256"]  # No temporary file left.
        assert damage(ckpts / "step_00000002.ckpt") is None
        assert torch.load(ckpts / "step_00000002.ckpt", weights_only=True)["global_step"] == 2
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


@pytest.mark.unit
@pytest.mark.parametrize("how", ["oserror", "torch"])
def test_full_disk_through_torch_writer_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """torch's zip writer turns the OSError of a full disk into `RuntimeError: [enforce fail at
    inline_container.cc]` (a file object) or `PytorchStreamWriter failed writing file` (a path, no OSError)."""
    io, ckpts = AtomicCheckpointIO(), tmp_path / "checkpoints"
    io.save_checkpoint({"w": torch.zeros(1000)}, ckpts / "step_00000001.ckpt")
    real_write = checkpoints.HashingWriter.write

    def full_after_1000_bytes(self: checkpoints.HashingWriter, data: object) -> int:
        if self.written > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def stream_writer_fails(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")

    if how == "oserror":
        monkeypatch.setattr(checkpoints.HashingWriter, "write", full_after_1000_bytes)
    else:
        monkeypatch.setattr(checkpoints.torch, "save", stream_writer_fails)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 12345))  # type: ignore[attr-defined]
    with pytest.raises(mlfab.CheckpointError) as e:
        io.save_checkpoint({"w": torch.zeros(2_000_000), "v": torch.zeros(10)}, ckpts / "step_00000002.ckpt")
    assert isinstance(e.value.__cause__, RuntimeError)
    assert str(e.value).startswith(
        f"Could not write checkpoint {ckpts / 'step_00000002.ckpt'}: the disk is full. Earlier checkpoints are "
        "intact: step_00000001.ckpt. The checkpoint needs about 8.0 MB and 12.3 kB are free on the disk of "
    )
    assert names(ckpts) == ["step_00000001.ckpt", "step_00000001.ckpt.sha256"]


# ---------------------------------------------------------------------------------------------------------------------
# Temporary files of killed saves.


@pytest.mark.unit
def test_stale_temporary_files_are_removed_but_not_a_live_save(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    stale = [ckpts / ".last.ckpt.abc123.tmp", ckpts / ".step_00000002.ckpt.sha256.x9.tmp"]
    live = ckpts / ".step_00000004.ckpt.def456.tmp"  # Being written by a process started after this one.
    for p in [*stale, live]:
        p.write_bytes(b"x" * 1000)
    long_ago = checkpoints.PROCESS_START - 60
    for p in stale:
        os.utime(p, (long_ago, long_ago))
    (ckpts / "gone.ckpt.sha256").write_text("0" * 64 + "  gone.ckpt\n")  # Its checkpoint was deleted by hand.
    assert newest_checkpoint(tmp_path, writer=False) is None
    assert all(p.exists() for p in stale)  # Only the process that writes the run's files removes anything.
    assert newest_checkpoint(tmp_path, writer=True) is None
    assert names(ckpts, ".*") == [live.name]
    assert not (ckpts / "gone.ckpt.sha256").exists()


# A task that kills itself with SIGKILL inside its Nth checkpoint save, at the point KILL_AT names:
# "write:<n>:<bytes>" (inside torch.save, after that many bytes), "fsync:<n>:1" (written, not yet renamed),
# "replace:<n>:1" (renamed, its checksum not yet written), "fsync:<n>:2" (while writing the checksum file).
KILLED_SCRIPT = """
import os, signal, sys
import mlfab
from mlfab import checkpoints
from mlfab.testing import BoringConfig, BoringTask

where, n, at = os.environ.get("KILL_AT", "none:0:0").split(":")
n, at = int(n), int(at)
saves = {"n": 0, "fsyncs": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save = checkpoints.AtomicCheckpointIO.save_checkpoint
def save(self, checkpoint, path, storage_options=None):
    saves["n"] += 1
    saves["fsyncs"] = 0
    return real_save(self, checkpoint, path, storage_options)
checkpoints.AtomicCheckpointIO.save_checkpoint = save

real_write = checkpoints.HashingWriter.write
def write(self, data):
    if where == "write" and saves["n"] == n and self.written >= at:
        die()
    return real_write(self, data)
checkpoints.HashingWriter.write = write

real_fsync, real_replace = os.fsync, os.replace
def fsync(fd):
    real_fsync(fd)
    saves["fsyncs"] += 1
    if where == "fsync" and saves["n"] == n and saves["fsyncs"] == at:
        die()
def replace(src, dst):
    real_replace(src, dst)
    if where == "replace" and saves["n"] == n and str(dst).endswith(".ckpt"):
        die()
os.fsync, os.replace = fsync, replace

BoringTask.launch(BoringConfig(in_dim=20000, valid_every_n_steps=None, save_every_n_seconds=None), argv=sys.argv[1:])
"""


def newest_loadable(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint file torch loads, found without mlfab."""
    for p in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        try:
            torch.load(p, weights_only=True)
            return p
        except Exception:  # noqa: BLE001, S112 - any failure: not loadable.
            continue
    return None


@pytest.mark.slow
def test_kill_during_saves_then_relaunch_cleans_up_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = [f"exp_dir={run}", "save_every_n_steps=1", "keep_last_n_checkpoints=2"]
    seed = int(os.environ.get("KILL_SEED", random.randrange(1000)))
    rng = random.Random(seed)
    # Inside torch.save (twice, at a random byte of the ~1 MB checkpoint: 20000 weights, Adam's moments and the
    # batch in flight), written but not renamed, renamed without its checksum, inside the checksum's write.
    points = [("write", rng.randrange(1, 4), rng.randrange(0, 900_000)) for _ in range(2)]
    points += [
        ("fsync", rng.randrange(1, 4), 1),
        ("replace", rng.randrange(1, 4), 1),
        ("fsync", rng.randrange(1, 4), 2),
    ]
    rng.shuffle(points)
    max_steps, left = 0, []
    for where, n, at in points:
        max_steps += 4
        expected = newest_loadable(ckpts)
        env = {**os.environ, "PYTHONPATH": PYTHONPATH, "KILL_AT": f"{where}:{n}:{at}"}
        proc = subprocess.run(
            [sys.executable, str(script), *args, f"max_steps={max_steps}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        point = f"kill at {where}:{n}:{at} (KILL_SEED={seed})"
        assert proc.returncode == -9, f"{point}: {proc.stderr[-3000:]}"
        # The previous kill's temporary files were removed, and the relaunch resumed from an intact checkpoint.
        assert bool(left) == ("that interrupted checkpoint saves left" in proc.stderr), f"{point}: {left}"
        resumed = re.search(r"Resuming from (\S+)", proc.stdout)
        assert (resumed and resumed.group(1)) == (expected and str(expected)), f"{point}: {proc.stdout[-2000:]}"
        left = names(ckpts, ".*.tmp")
        assert bool(left) == (where != "replace"), f"{point}: {left}"  # The kill came inside the save.

    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.run(
        [sys.executable, str(script), *args, f"max_steps={max_steps}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"KILL_SEED={seed}: {proc.stderr[-3000:]}"
    assert bool(left) == ("that interrupted checkpoint saves left" in proc.stderr)
    assert not names(ckpts, ".*.tmp")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == max_steps
    assert len(names(ckpts, "step_*.ckpt")) == 2
    assert all(damage(p) is None for p in ckpts.glob("*.ckpt"))


@pytest.mark.integration
def test_a_run_started_from_another_runs_checkpoint_goes_on_from_its_own_when_relaunched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relaunch (or a requeued Slurm job, whose command keeps `--ckpt_path`) of a run started from another run's
    checkpoint resumes from this run's newest checkpoint: it used to start over from the other run's every time."""
    first, second = tmp_path / "first", tmp_path / "second"
    launch(first, max_steps=4)
    started = first / "checkpoints" / "last.ckpt"
    args = ["fit", f"--ckpt_path={started}", f"--model.config.exp_dir={second}", "--model.config.save_every_n_steps=2"]
    BoringTask.launch(BoringConfig(valid_every_n_steps=None), argv=[*args, "--model.config.max_steps=6"])
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    capsys.readouterr()
    BoringTask.launch(BoringConfig(valid_every_n_steps=None), argv=[*args, "--model.config.max_steps=8"])
    out = capsys.readouterr().out
    assert f"Resuming from this run's newest checkpoint, not --ckpt_path {started}" in out
    assert f"Resuming from {second / 'checkpoints' / 'last.ckpt'}" in out
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert torch.load(started, weights_only=True)["global_step"] == 4  # The other run is untouched.


@pytest.mark.integration
def test_a_copied_checkpoint_never_writes_into_the_run_it_was_copied_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning merges the checkpoint's config, `exp_dir` included: `validate` / `fit` of a copy of a checkpoint of
    a run started with `exp_dir=` logged into that run, and `fit` rewrote its config.yaml and last.ckpt."""
    original, copies = tmp_path / "original", tmp_path / "copies"
    launch(original, max_steps=4)
    copies.mkdir()
    for path in (original / "checkpoints").glob("last.ckpt*"):
        shutil.copy(path, copies / path.name)
    before = {p: p.read_bytes() for p in (original / "config.yaml", original / "checkpoints" / "last.ckpt")}
    runs = f"--model.config.run_dir={tmp_path / 'runs'}"
    for command in (["validate"], ["fit", "--model.config.max_steps=6"]):
        capsys.readouterr()
        BoringTask.launch(BoringConfig(), argv=[*command, f"--ckpt_path={copies / 'last.ckpt'}", runs])
        assert f"Run directory: {tmp_path / 'runs'}" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.integration
def test_fit_from_a_runs_checkpoint_starts_a_new_run_and_leaves_that_run_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fit --ckpt_path <run>/checkpoints/step_4.ckpt` rewound that run when it had been started with `exp_dir=`
    (the checkpoint's config carries it): its later checkpoints were pruned and its config.yaml rewritten, while a run
    started with `run_dir=` got a new directory. It is a new run either way, as in Lightning; `exp_dir=<run>` given
    on purpose continues that run from the checkpoint."""
    original = tmp_path / "original"
    launch(original)  # exp_dir=original, checkpoints at steps 4 and 6 kept.
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    step_4 = original / "checkpoints" / "step_00000004.ckpt"
    capsys.readouterr()
    BoringTask.launch(BoringConfig(), argv=["fit", f"--ckpt_path={step_4}", f"--model.config.run_dir={tmp_path}/runs"])
    out = capsys.readouterr().out
    assert f"Run directory: {tmp_path / 'runs'}" in out and f"Resuming from {step_4}" in out
    (new,) = (tmp_path / "runs" / "boring_task").iterdir()
    assert torch.load(new / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.integration
def test_a_rewind_is_done_once_and_its_relaunch_goes_on_from_the_newest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fit --ckpt_path <run>/checkpoints/step_4.ckpt exp_dir=<run>` rewinds the run, as asked; the same command again
    (a relaunch, a requeued Slurm job) went back to step 4 every time, or failed once step 4 was pruned."""
    run = tmp_path / "run"
    launch(run, keep_last_n_checkpoints=10)  # Steps 2, 4, 6.
    step_4 = run / "checkpoints" / "step_00000004.ckpt"
    rewind = ["fit", f"--ckpt_path={step_4}", "--model.config.max_steps=8", "--model.config.keep_last_n_checkpoints=10"]
    BoringTask.launch(BoringConfig(exp_dir=str(run), save_every_n_steps=2, valid_every_n_steps=None), argv=rewind)
    assert f"Resuming from {step_4}" in capsys.readouterr().out
    rewind[2] = "--model.config.max_steps=10"
    BoringTask.launch(BoringConfig(exp_dir=str(run), save_every_n_steps=2, valid_every_n_steps=None), argv=rewind)
    out = capsys.readouterr().out
    assert f"not --ckpt_path {step_4} (which an earlier launch of this run already went on from)" in out
    assert f"Resuming from {run / 'checkpoints' / 'last.ckpt'}" in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Training raises at `step` (the checkpoints of the steps before it are saved), as a crash would stop it."""
    real = BoringTask.get_loss

    def get_loss(self: BoringTask, batch: Any, state: mlfab.State) -> Any:
        if state.phase == "train" and state.num_steps == step:
            raise RuntimeError(f"crash at step {step}")
        return real(self, batch, state)

    monkeypatch.setattr(BoringTask, "get_loss", get_loss)


@pytest.mark.integration
def test_a_rewinds_relaunch_goes_on_once_the_checkpoint_it_rewound_to_was_pruned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewind's own command, relaunched (a requeued Slurm job) after keep_last_n_checkpoints pruned the step-4
    checkpoint it rewound to, failed with "--ckpt_path ...step_00000004.ckpt: no such checkpoint file"."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    launch(run, keep_last_n_checkpoints=2, learning_rate=0.02)  # Steps 4 and 6 kept.
    step_2, step_4 = ckpts / "step_00000002.ckpt", ckpts / "step_00000004.ckpt"
    config = BoringConfig(save_every_n_steps=2, save_every_n_seconds=None, valid_every_n_steps=None)
    rewind = ["fit", f"--ckpt_path={step_4}", f"--model.config.exp_dir={run}", "--model.config.max_steps=12"]
    # A pruned checkpoint this run never went on from is still no checkpoint to start from.
    with pytest.raises(mlfab.CheckpointError, match=rf"--ckpt_path {re.escape(str(step_2))}: no such checkpoint file"):
        BoringTask.launch(config, argv=["fit", f"--ckpt_path={step_2}", *rewind[2:]])
    with monkeypatch.context() as m:
        crash_at(m, 9)
        with pytest.raises(RuntimeError, match="crash at step 9"):
            BoringTask.launch(config, argv=rewind)
    assert names(ckpts, "step_*.ckpt") == ["step_00000006.ckpt", "step_00000008.ckpt"]  # Step 4 pruned.
    capsys.readouterr()
    BoringTask.launch(config, argv=rewind)
    out = capsys.readouterr().out
    assert f"not --ckpt_path {step_4} (which an earlier launch of this run already went on from)" in out
    assert f"Resuming from {ckpts / 'step_00000008.ckpt'}" in out
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
    # The config the rewind had: the checkpoint's (learning_rate) with the command's values over it.
    written = yaml.safe_load((run / "config.yaml").read_text())["model"]["config"]
    assert written["learning_rate"] == 0.02 and written["max_steps"] == 12
    launches = yaml.safe_load((run / "provenance" / "launches.yaml").read_text())
    assert [e["resumed_from"] for e in launches[-2:]] == [str(step_4), str(ckpts / "step_00000008.ckpt")]


@pytest.mark.integration
def test_a_run_started_from_another_runs_pruned_checkpoint_goes_on_from_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other run went on and pruned the checkpoint this run started from: this run's relaunch failed."""
    first, second = tmp_path / "first", tmp_path / "second"
    launch(first, keep_last_n_checkpoints=2)  # Steps 4 and 6 kept.
    started = first / "checkpoints" / "step_00000004.ckpt"
    config = BoringConfig(save_every_n_steps=2, save_every_n_seconds=None, valid_every_n_steps=None)
    args = ["fit", f"--ckpt_path={started}", f"--model.config.exp_dir={second}", "--model.config.max_steps=10"]
    with monkeypatch.context() as m:
        crash_at(m, 7)
        with pytest.raises(RuntimeError, match="crash at step 7"):
            BoringTask.launch(config, argv=args)
    launch(first, keep_last_n_checkpoints=2, max_steps=10)
    assert not started.exists()
    capsys.readouterr()
    BoringTask.launch(config, argv=args)
    out = capsys.readouterr().out
    assert f"not --ckpt_path {started} (which started it)" in out
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    # A new run from it has nothing to go on from.
    with pytest.raises(mlfab.CheckpointError, match="no such checkpoint file"):
        BoringTask.launch(config, argv=["fit", f"--ckpt_path={started}", f"--model.config.run_dir={tmp_path}"])
    assert not (tmp_path / "boring_task").exists()


@pytest.mark.integration
def test_an_evaluation_of_a_run_without_ckpt_path_evaluates_its_newest_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate exp_dir=<trained run>` evaluated a freshly initialised model and logged it into the run at step 0."""
    run = tmp_path / "run"
    launch(run)
    capsys.readouterr()
    BoringTask.launch(BoringConfig(exp_dir=str(run)), argv=["validate"])
    assert f"Weights from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    valid = read_scalars(run / "tensorboard" / "valid")["loss/loss"]
    assert [step for step, _ in valid][-1] == 6 and 0 not in [step for step, _ in valid]


@pytest.mark.integration
def test_a_run_copied_without_file_times_resumes_from_its_newest_and_prunes_its_oldest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cp -r` or an object store gives every file a new modification time, in whatever order they were copied: the
    relaunch resumed from (and `keep_last_n_checkpoints` pruned by) those times, here from step 2 and pruning step 6."""
    run = tmp_path / "run"
    launch(run, keep_last_n_checkpoints=3)  # step_2, step_4, step_6, last (step 6).
    ckpts = run / "checkpoints"
    copied_first_to_last = ["last.ckpt", "step_00000006.ckpt", "step_00000004.ckpt", "step_00000002.ckpt"]
    for i, name in enumerate(copied_first_to_last):
        os.utime(ckpts / name, (1_000_000 + i, 1_000_000 + i))
    capsys.readouterr()
    launch(run, keep_last_n_checkpoints=3, max_steps=8)
    assert f"Resuming from {ckpts / 'last.ckpt'}" in capsys.readouterr().out
    assert names(ckpts, "step_*.ckpt") == ["step_00000004.ckpt", "step_00000006.ckpt", "step_00000008.ckpt"]


@pytest.mark.integration
def test_a_rewind_that_saved_nothing_is_done_again_by_its_relaunch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewind to step 2 that crashed before its first checkpoint: its relaunch (the same command) went on from the
    newest checkpoint, step 6 of the branch the rewind had left."""
    run = tmp_path / "run"
    launch(run, keep_last_n_checkpoints=10)  # Steps 2, 4, 6.
    step_2 = run / "checkpoints" / "step_00000002.ckpt"
    rewind = ["fit", f"--ckpt_path={step_2}", "--model.config.max_steps=8", "--model.config.keep_last_n_checkpoints=10"]
    config = BoringConfig(exp_dir=str(run), save_every_n_steps=2, valid_every_n_steps=None)

    def crash(self: BoringTask, batch: object, state: object) -> None:
        raise RuntimeError("crash at the first step after the rewind")

    with monkeypatch.context() as m:
        m.setattr(BoringTask, "get_loss", crash)
        with pytest.raises(RuntimeError, match="crash at the first step"):
            BoringTask.launch(config, argv=rewind)
    capsys.readouterr()
    BoringTask.launch(config, argv=rewind)
    out = capsys.readouterr().out
    assert f"Resuming from {step_2}" in out and "already went on from" not in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


@pytest.mark.integration
def test_validate_of_a_run_trained_without_validation_says_it_would_run_nothing(tmp_path: Path) -> None:
    """It ran no batch, logged nothing and said `Finished.`, as if it had validated."""
    run = tmp_path / "run"
    launch(run, valid_batches=0)
    with pytest.raises(mlfab.ConfigError, match=r"validate would run no batch: valid_batches is 0"):
        BoringTask.launch(argv=["validate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    BoringTask.launch(
        argv=["validate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--model.config.valid_batches=2"]
    )
    assert [step for step, _ in read_scalars(run / "tensorboard" / "valid")["loss/loss"]] == [6]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("subcommand", "limit"),
    [("fit", "limit_train_batches"), ("test", "limit_test_batches"), ("predict", "limit_predict_batches")],
)
def test_a_subcommand_limited_to_no_batch_is_refused(tmp_path: Path, subcommand: str, limit: str) -> None:
    """`test --trainer.limit_test_batches 0` ran nothing, wrote no record and said `Finished.`, as if it had tested;
    `fit --trainer.limit_train_batches 0` said "Finished at step 0"."""
    run = tmp_path / "run"
    launch(run)
    before = sorted(run.rglob("*"))
    argv = [subcommand, f"--model.config.exp_dir={run}", f"--trainer.{limit}=0"]
    with pytest.raises(mlfab.ConfigError) as info:
        BoringTask.launch(argv=argv)
    assert str(info.value) == (
        f"{subcommand} would run no batch: --trainer.{limit} is 0. Set --trainer.{limit} to the number of batches to "
        f"{subcommand} on, or leave it out."
    )
    assert sorted(run.rglob("*")) == before  # The run as it was.


@pytest.mark.integration
def test_the_runs_files_have_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """Checkpoints, their checksums, config.yaml and provenance were 0600 (a temporary file's mode, kept by the
    rename) where the event files beside them were 0644: the user's group could not read the run."""
    code = (
        "import os, sys\n"
        "from mlfab.testing import BoringConfig, BoringTask\n"
        "os.umask(0o027)  # After the import, as a script sets it.\n"
        "BoringTask.launch(BoringConfig(valid_every_n_steps=None, save_every_n_seconds=None), argv=sys.argv[1:])\n"
    )
    run = tmp_path / "run"
    args = [sys.executable, "-c", code, "max_steps=4", "save_every_n_steps=2", f"exp_dir={run}"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    for name in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/last.ckpt.sha256",
        "checkpoints/step_00000004.ckpt",
    ):
        assert name in files
    assert any(name.startswith("provenance/") for name in files) and any("tfevents" in name for name in files)
    assert {name: mode for name, mode in files.items() if mode != oct(0o640)} == {}


@pytest.mark.integration
def test_a_damaged_checksum_file_beside_an_intact_checkpoint_does_not_throw_that_checkpoint_away(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint was taken for damaged: the run went on from an older one, and overwrote the intact newest."""
    run = tmp_path / "run"
    launch(run)
    last = run / "checkpoints" / "last.ckpt"
    checksum_path(last).write_text("garbage\n")
    capsys.readouterr()
    launch(run, max_steps=8)
    out, err = capsys.readouterr()
    said = f"The checksum file {checksum_path(last)} is unreadable (not a sha256 line): last.ckpt is checked only"
    assert err.count(said) == 1 and "corrupt" not in err
    assert f"Resuming from {last}\n" in out + err  # Not from the older step_00000006.ckpt.
    assert torch.load(last, weights_only=True)["global_step"] == 8 and damage(last) is None
    assert BoringTask.load_from_checkpoint(last).weights_step == 8


SLOW_SCRIPT = """
import sys, time
from mlfab import testing
from mlfab.testing import BoringConfig

class BoringTask(testing.BoringTask):  # The same task, slower.
    def on_step_end(self, state, loss_dict):
        if state.num_steps == 2:
            print("training", flush=True)
        time.sleep(0.05)

BoringTask.launch(BoringConfig(valid_every_n_steps=None, save_every_n_seconds=None), argv=sys.argv[1:])
"""


@pytest.mark.integration
def test_a_second_fit_into_a_run_that_is_training_is_refused(tmp_path: Path) -> None:
    """Both trained into one directory: the second's checkpoints overwrote the first's, their logs were mixed, and
    both said they finished."""
    run = tmp_path / "run"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    args = [sys.executable, str(script), "max_steps=100000", "save_every_n_steps=5", f"exp_dir={run}"]
    args.append("num_dataloader_workers=2")  # Forked workers, which must not hold the lock for it.
    first = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        if "training\n" not in iter(first.stdout.readline, ""):  # Reads up to that line (or the end: a failure).
            pytest.fail(first.communicate(timeout=60)[1][-3000:])
        config_yaml = (run / "config.yaml").read_text()
        with pytest.raises(mlfab.ConfigError, match=rf"Another process is training in the run {re.escape(str(run))}"):
            launch(run)
        assert (run / "config.yaml").read_text() == config_yaml  # Nothing of the refused launch written.
        with pytest.raises(mlfab.ConfigError, match="Another process is training"):  # Also in the fit form.
            launch(run, "fit", "--trainer.max_steps=3")
        deadline = time.monotonic() + 60
        while newest_checkpoint(run) is None:  # (A loaded machine may not have written its first one yet.)
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        first.kill()  # Its main process alone: its workers outlive it for a few seconds.
        first.wait(60)
    newest = newest_checkpoint(run)
    assert newest is not None
    stopped_at = int(torch.load(newest, weights_only=True)["global_step"])
    launch(run, max_steps=stopped_at + 2)  # At once, a relaunch goes on from it.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped_at + 2


class LaunchesAnother(BoringTask):
    """Launches a small fit of another run from inside its own (an evaluation of a baseline, say)."""

    held_after: list[Path] = []

    def on_step_end(self, state: mlfab.State, loss_dict: dict[str, torch.Tensor]) -> None:
        if state.num_steps == 2:
            BoringTask.launch(BoringConfig(max_steps=1, valid_every_n_steps=None), argv=[f"exp_dir={self.exp_dir}-b"])
            LaunchesAnother.held_after = sorted(run_dirs_held())


@pytest.mark.integration
def test_a_launch_inside_a_fit_keeps_that_fits_run_locked(tmp_path: Path) -> None:
    """The inner launch's end let go of every lock the process held, the outer fit's too."""
    LaunchesAnother.launch(BoringConfig(max_steps=3, valid_every_n_steps=None), argv=[f"exp_dir={tmp_path / 'a'}"])
    assert LaunchesAnother.held_after == [tmp_path / "a"]
    assert run_dirs_held() == set()
