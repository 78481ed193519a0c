"""Exact resume: an interrupted and resumed run has the uninterrupted run's losses at every later step."""

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mlfab
from mlfab.checkpoints import file_sha256, write_checksum
from mlfab.testing import BoringConfig

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Keep the caller's entries.

# A task whose data samples at random (dpshdl, per-worker generators) and whose model uses dropout, so any
# lost or repeated batch, or any RNG state not restored, changes the losses. It records every step's loss
# and can interrupt itself at a given step: with SIGTERM (graceful) or SIGKILL (nothing saved at that moment).
SCRIPT = """
import json, os, signal, sys
import torch
import torch.nn.functional as F
from torch import nn
import mlfab
from mlfab.testing import BoringConfig, BoringTask

class Recorded(BoringTask):
    def __init__(self, config):
        super().__init__(config)
        self.drop = nn.Dropout(0.3)

    def get_loss(self, batch, state):
        x, y = batch
        loss = F.mse_loss(self.layer(self.drop(x)).squeeze(-1), y)
        if state.phase == "train":
            with open(os.environ["LOSS_FILE"], "a") as f:
                f.write(json.dumps([state.num_steps, loss.item()]) + "\\n")
            stop = os.environ.get("STOP_AT")
            if stop and state.num_steps == int(stop):
                os.kill(os.getpid(), getattr(signal, os.environ["STOP_WITH"]))
        return loss

if __name__ == "__main__":
    Recorded.launch(BoringConfig(), argv=sys.argv[1:])
"""


def run_task(tmp_path: Path, losses: Path, *args: str, stop_at: int | None = None, stop_with: str = "SIGTERM") -> int:
    script = tmp_path / "recorded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "LOSS_FILE": str(losses), "STOP_WITH": stop_with}
    if stop_at is not None:
        env["STOP_AT"] = str(stop_at)
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    if proc.returncode not in (0, 143, -9):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def read_losses(path: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        step, loss = json.loads(line)
        out[step] = loss  # A resumed run rewrites the steps after its checkpoint.
    return out


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_exactly(tmp_path: Path, workers: int, how: str) -> None:
    common = [
        "max_steps=40",
        "batch_size=4",
        "valid_every_n_steps=15",
        f"num_dataloader_workers={workers}",
        "save_every_n_steps=10",
        "save_every_n_seconds=null",
    ]
    reference = tmp_path / "reference.jsonl"
    assert run_task(tmp_path, reference, *common, f"exp_dir={tmp_path / 'ref'}") == 0

    resumed = tmp_path / "resumed.jsonl"
    exp_dir = f"exp_dir={tmp_path / 'run'}"
    code = run_task(tmp_path, resumed, *common, exp_dir, stop_at=23, stop_with=how)
    assert code == (143 if how == "SIGTERM" else -9)
    ckpts = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    # SIGTERM saves at the step boundary; SIGKILL leaves only the periodic checkpoint of step 20.
    assert "last.ckpt" in ckpts if how == "SIGTERM" else "last.ckpt" not in ckpts
    first = read_losses(resumed)
    assert max(first) == 23

    assert run_task(tmp_path, resumed, *common, exp_dir) == 0
    expected, got = read_losses(reference), read_losses(resumed)
    assert sorted(got) == list(range(40))
    resumed_from = 24 if how == "SIGTERM" else 20
    for step in range(resumed_from, 40):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    # The comparison can fail: a run with another seed has other losses.
    other = tmp_path / "other.jsonl"
    run_task(tmp_path, other, *common, "seed=7", f"exp_dir={tmp_path / 'other'}")
    assert read_losses(other)[30] != expected[30]

    log = (tmp_path / "run" / "provenance" / "launches.yaml").read_text()
    assert log.count("resumed: true") == 1 and log.count("resumed: false") == 1


def launch_boring(tmp_path: Path, **overrides: object) -> None:
    config = BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=6, save_every_n_steps=2, save_every_n_seconds=None)
    mlfab.testing.BoringTask.launch(config, argv=[f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.integration
def test_state_counters_and_elapsed_time_continue(tmp_path: Path) -> None:
    launch_boring(tmp_path)
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["mlfab"]
    launch_boring(tmp_path, max_steps=10)
    second = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 10
    assert second["mlfab"]["num_samples"] == 10 * 8
    assert second["mlfab"]["elapsed_time_s"] > first["elapsed_time_s"]
    assert second["mlfab"]["start_time_s"] == first["start_time_s"]


@pytest.mark.integration
def test_corrupt_checkpoint_names_the_file_and_the_good_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    launch_boring(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    given = [f"--ckpt_path={last}", f"--model.config.exp_dir={tmp_path / 'other'}"]
    with pytest.raises(
        mlfab.MlfabError, match=r"last.ckpt is corrupt or truncated: .* checkpoint .*step_\d+.ckpt is intact"
    ):
        mlfab.testing.BoringTask.launch(argv=["fit", *given])  # Given: refused.
    assert not (tmp_path / "other").exists()
    launch_boring(tmp_path, max_steps=8)  # Chosen by the relaunch: the newest intact one is used instead, saying so.
    assert re.search(r"last.ckpt \(.*\) is corrupt or truncated: using .*step_00000006.ckpt", capsys.readouterr().err)


class Pair(tuple):
    """A tuple of a type of its own, which a batch in flight is stored as (mlfab stores namedtuples as data)."""


@pytest.mark.integration
def test_checkpoint_torch_will_not_load_safely_is_explained(tmp_path: Path) -> None:
    launch_boring(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["extra"] = Pair((1, 2))  # As such a batch in flight would be stored.
    torch.save(checkpoint, last)
    write_checksum(last, file_sha256(last))  # As when mlfab itself saved such a batch.
    with pytest.raises(
        mlfab.MlfabError, match=r"last.ckpt holds an object that torch's safe loading .*\(a tuple or list"
    ):
        launch_boring(tmp_path, max_steps=8)


@pytest.mark.integration
def test_resuming_reads_the_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch_boring(tmp_path)
    reads: list[str] = []
    real_load = torch.load

    def counting_load(f: object, *args: object, **kwargs: object) -> object:
        reads.append(str(getattr(f, "name", f)))  # Lightning passes an open file.
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    launch_boring(tmp_path, max_steps=8)
    assert [r for r in reads if r.endswith(".ckpt")] == [str(tmp_path / "run" / "checkpoints" / "last.ckpt")]


@pytest.mark.integration
def test_checkpoint_of_another_task_is_refused(tmp_path: Path) -> None:
    launch_boring(tmp_path)

    class OtherTask(mlfab.testing.BoringTask):
        pass

    with pytest.raises(mlfab.MlfabError, match=r"is a run of BoringTask, not of .*OtherTask: point it at a run of"):
        OtherTask.launch(BoringConfig(exp_dir=str(tmp_path / "run")), argv=[])
    loose = tmp_path / "loose.ckpt"  # Outside a run: the checkpoint itself names its task.
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", loose)
    with pytest.raises(mlfab.MlfabError, match=r"was written by task mlfab.testing.BoringTask, not .*OtherTask"):
        OtherTask.launch(BoringConfig(exp_dir=str(tmp_path / "other")), argv=["fit", f"--ckpt_path={loose}"])


@pytest.mark.integration
def test_incompatible_config_is_refused_with_the_difference(tmp_path: Path) -> None:
    launch_boring(tmp_path)
    with pytest.raises(mlfab.MlfabError, match=r"does not fit this model(.|\n)*layer.weight(.|\n)*in_dim: 4 -> 3"):
        launch_boring(tmp_path, in_dim=3)


@pytest.mark.integration
def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from mlfab import checkpoints

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj: object, f: object) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(
        mlfab.MlfabError,
        match=r"Could not write checkpoint .*step_00000004.ckpt: the disk is full\. "
        r"Earlier checkpoints are intact: step_00000002.ckpt",
    ):
        launch_boring(tmp_path)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["step_00000002.ckpt", "step_00000002.ckpt.sha256"]  # No temporary file left behind.
    assert torch.load(tmp_path / "run" / "checkpoints" / files[0], weights_only=True)["global_step"] == 2


@pytest.mark.unit
@pytest.mark.parametrize("key", ["exp_dir", "run_dir"])
def test_run_directory_that_cannot_be_created(tmp_path: Path, key: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(mlfab.ConfigError, match=rf"Cannot create the run directory under .*file/run .*Set {key} to a"):
        mlfab.testing.BoringTask.launch(BoringConfig(**{key: str(blocker / "run")}), argv=[])


# Launches into the directory given, as the user given in AS_USER ("uid:gid") when there is one. That user becomes
# the process's real user only: the kernel's access checks, which the run directory check makes, are made for it,
# while files are still opened as the effective user (root), who can import from wherever Python is installed.
LOCKED_LAUNCH = """
import os, sys
import mlfab
from mlfab.testing import BoringConfig, BoringTask

if os.environ.get("AS_USER"):
    uid, gid = map(int, os.environ["AS_USER"].split(":"))
    os.setgroups([])
    os.setresgid(gid, os.getegid(), os.getegid())
    os.setresuid(uid, os.geteuid(), os.geteuid())
try:
    BoringTask.launch(BoringConfig(exp_dir=sys.argv[1]), argv=[])
except mlfab.ConfigError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.integration
def test_run_directory_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)  # Its owner may list it but not create anything in it.
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    if os.geteuid() == 0:  # Root may write anywhere (CI runs as root): launch as nobody, into nobody's directory.
        try:
            uid, gid = pwd.getpwnam("nobody")[2:4]
        except KeyError:  # No passwd entry: any unprivileged ids do.
            uid = gid = 65534
        os.chown(locked, uid, gid)
        env["AS_USER"] = f"{uid}:{gid}"
    script = tmp_path / "locked_launch.py"
    script.write_text(LOCKED_LAUNCH)
    proc = subprocess.run(
        [sys.executable, str(script), str(locked)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"The run directory {locked} is not writable" in proc.stdout
    assert not any(locked.iterdir())  # Nothing started.


class ThirtyTwo(torch.utils.data.Dataset):
    """A map-style dataset: 4 shuffled batches of 8 per epoch."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return x, x.sum()


class OwnGenerator(ThirtyTwo):
    """Augments each sample with noise from a generator of its own (not the global ones)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return x + torch.from_numpy(self.rng.normal(size=4).astype(np.float32)), y


class MapStyle(mlfab.testing.BoringTask):
    losses: dict[int, float] = {}
    dataset_cls: type[ThirtyTwo] = ThirtyTwo

    def get_dataset(self, phase: mlfab.Phase) -> ThirtyTwo:
        return self.dataset_cls()

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            MapStyle.losses[state.num_steps] = loss.item()
        return loss


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("stop_at", "dataset_cls"),
    # At an epoch's end, and half-way through the second epoch; and a dataset drawing from a generator it holds,
    # whose state a resume did not restore.
    [(4, ThirtyTwo), (6, ThirtyTwo), (6, OwnGenerator)],
)
def test_map_style_data_resumes_exactly(
    tmp_path: Path, workers: int, stop_at: int, dataset_cls: type[ThirtyTwo], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MapStyle, "dataset_cls", dataset_cls)

    def launch(exp_dir: Path, max_steps: int) -> dict[int, float]:
        MapStyle.losses = {}
        MapStyle.launch(
            BoringConfig(
                exp_dir=str(exp_dir),
                max_steps=max_steps,
                num_dataloader_workers=workers,
                valid_every_n_steps=None,
                save_every_n_seconds=None,
            ),
            argv=[],
        )
        return MapStyle.losses

    expected = launch(tmp_path / "ref", 12)
    launch(tmp_path / "run", stop_at)
    got = launch(tmp_path / "run", 12)  # Resumes from the final checkpoint of step `stop_at`.
    assert sorted(got) == list(range(stop_at, 12))
    assert got == {step: expected[step] for step in range(stop_at, 12)}


class CrashOnce(mlfab.testing.BoringTask):
    """Writes every step to TensorBoard and log.jsonl; raises at step 8 of its first launch into a directory."""

    def set_loggers(self) -> None:
        self.add_logger(
            mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0.0),
            mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0.0),
        )

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        marker = self.exp_dir / "crashed_once"
        if state.phase == "train" and state.num_steps == 8 and self.config.run_dir == "crash" and not marker.exists():
            marker.touch()
            raise RuntimeError("crash after the checkpoint")
        return super().get_loss(batch, state)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("valid_every", "save_every"),
    [(4, 3), (3, 3), (4, None)],  # At 3, the checkpoint at step 6 comes before its validation. None: no checkpoint.
)
def test_steps_written_after_the_checkpoint_before_a_crash_read_once(
    tmp_path: Path, valid_every: int, save_every: int | None
) -> None:
    """A crash at step 8 after a checkpoint at step 6: the first launch wrote steps 6-7 (and a validation) that the
    resumed run writes again. TensorBoard's reader and a log.jsonl reader that honours its resume line see every
    step once, with the uninterrupted run's values. Without a checkpoint the relaunch starts over, and every step
    it writes was written twice (the restart marker was only written on a resume)."""
    from mlfab.testing import read_scalars

    def launch(exp: Path, run_dir: str) -> None:
        settings = {"max_steps": 10, "save_every_n_steps": save_every, "valid_every_n_steps": valid_every}
        CrashOnce.launch(BoringConfig(**settings, run_dir=run_dir, exp_dir=str(exp)), argv=[])

    launch(tmp_path / "once", "once")
    with pytest.raises(RuntimeError, match="crash after the checkpoint"):
        launch(tmp_path / "crashed", "crash")
    # TensorBoard reads a directory's event files in name order, whose time is in whole seconds: a relaunch (a new
    # process, later) names its file after the crashed launch's.
    time.sleep(1.05)
    launch(tmp_path / "crashed", "crash")

    def json_lines(exp: Path) -> list[tuple[str, int, float]]:
        kept: list[dict] = []
        for line in map(json.loads, (exp / "json" / "log.jsonl").read_text().splitlines()):
            if line["phase"] == "resume":
                kept = [k for k in kept if k["step"] < line["steps"].get(k["phase"], k["step"] + 1)]
            elif "loss/loss" in line.get("scalars", {}):
                kept.append(line)
        return [(k["phase"], k["step"], k["scalars"]["loss/loss"]) for k in kept]

    assert json_lines(tmp_path / "crashed") == json_lines(tmp_path / "once")
    for phase in ("train", "valid"):
        once = read_scalars(tmp_path / "once" / "tensorboard" / phase)["loss/loss"]
        assert read_scalars(tmp_path / "crashed" / "tensorboard" / phase)["loss/loss"] == once
    assert [step for step, _ in once] == [1, *range(valid_every, 11, valid_every), *([10] if 10 % valid_every else [])]


class NoisyEverywhere(MapStyle):
    """Draws from the global generator in every phase (noise in the loss: a diffusion model's, say)."""

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        loss = mlfab.testing.BoringTask.get_loss(self, batch, state) + torch.randn(()) * 0.1
        if state.phase == "train":
            MapStyle.losses[state.num_steps] = loss.item()
        return loss


@pytest.mark.integration
def test_a_resume_after_max_steps_draws_the_random_numbers_the_uninterrupted_run_draws(tmp_path: Path) -> None:
    """`last.ckpt` held the random state after the final validation, which the uninterrupted run did not run at that
    step: every random number after the resume was another."""

    def launch(exp_dir: Path, max_steps: int) -> dict[int, float]:
        MapStyle.losses = {}
        config = BoringConfig(
            exp_dir=str(exp_dir), max_steps=max_steps, valid_every_n_steps=4, save_every_n_seconds=None
        )
        NoisyEverywhere.launch(config, argv=[])
        return MapStyle.losses

    expected = launch(tmp_path / "ref", 12)
    launch(tmp_path / "run", 6)  # Its final validation draws noise; the reference validates at 4 and 8.
    got = launch(tmp_path / "run", 12)
    assert got == {step: expected[step] for step in range(6, 12)}


class Numbered(torch.utils.data.Dataset):
    """Sample i is (i as a feature row, i): each batch says which samples it holds."""

    count = 40

    def __len__(self) -> int:
        return Numbered.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)), torch.tensor(float(i))


class SeesNumbers(mlfab.testing.BoringTask):
    seen: list[list[int]] = []

    def get_dataset(self, phase: mlfab.Phase) -> Numbered:
        return Numbered()

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        if state.phase == "train":
            SeesNumbers.seen.append([int(i) for i in batch[1]])
        return super().get_loss((batch[0] * 0.01, batch[1] * 0.01), state)


@pytest.mark.integration
def test_a_resume_into_a_training_set_of_another_length_says_what_it_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved position of the old set's epoch was applied to the new set without a word: of that epoch's rest,
    some samples came again and others never."""
    config = BoringConfig(
        exp_dir=str(tmp_path / "run"), batch_size=4, valid_every_n_steps=None, save_every_n_seconds=None
    )
    SeesNumbers.launch(config, argv=["max_steps=3"])  # 3 batches of a 40-sample epoch (10 batches).
    capsys.readouterr()
    SeesNumbers.launch(config, argv=["max_steps=5"])  # The same set: nothing said.
    assert "The training set has" not in capsys.readouterr().err
    monkeypatch.setattr(Numbered, "count", 20)  # Data removed before the relaunch.
    SeesNumbers.seen = []
    SeesNumbers.launch(config, argv=["max_steps=11"])
    err = capsys.readouterr().err
    assert "The training set has 20 samples, 40 when the checkpoint was written: the rest of the epoch" in err
    # The epoch it was saved in had 5 batches done, all the new set has: the next epoch is the new set's, whole.
    assert sorted(i for batch in SeesNumbers.seen[:5] for i in batch) == list(range(20))


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [5, 7])  # At an epoch's end (5 batches), and inside the next one.
def test_epochs_cut_short_by_limit_train_batches_resume_exactly(tmp_path: Path, workers: int, stop_at: int) -> None:
    """A resume at the end of an epoch `limit_train_batches` cut short trained on the batch Lightning had fetched
    ahead, and then went on with that abandoned pass: every later step's samples were off by one batch."""

    def launch(exp_dir: Path, max_steps: int) -> list[list[int]]:
        SeesNumbers.seen = []
        config = BoringConfig(exp_dir=str(exp_dir), batch_size=4, valid_every_n_steps=None, save_every_n_seconds=None)
        args = ["fit", f"--model.config.max_steps={max_steps}", f"--model.config.num_dataloader_workers={workers}"]
        args.append("--trainer.limit_train_batches=5")
        SeesNumbers.launch(config, argv=args)
        return SeesNumbers.seen

    expected = launch(tmp_path / "ref", 13)
    assert len(expected) == 13 and len({i for batch in expected[:5] for i in batch}) == 20  # (One pass's batches.)
    launch(tmp_path / "run", stop_at)
    assert launch(tmp_path / "run", 13) == expected[stop_at:]


class FiniteNoisyStream(torch.utils.data.IterableDataset):
    """30 samples a pass, each with noise from the global generator of the worker (or process) that reads it."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index, count = mlfab.worker_shard()
        for i in range(index, 30, count):
            yield torch.full((4,), float(i)) + torch.rand(4), torch.tensor(float(i))


class SeesStream(mlfab.testing.BoringTask):
    seen: list[list[float]] = []

    def get_dataset(self, phase: mlfab.Phase) -> FiniteNoisyStream:
        return FiniteNoisyStream()

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        if state.phase == "train":
            SeesStream.seen.append([round(float(v), 6) for v in batch[0][:, 0]])
        return super().get_loss((batch[0] * 0.01, batch[1] * 0.01), state)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [3, 20])  # In the first pass, and in the third.
def test_a_finite_stream_without_a_state_of_its_own_resumes_with_its_random_numbers(
    tmp_path: Path, workers: int, stop_at: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its resume re-ran the pass from the worker's fresh seed: the samples were right, their noise another's
    after the first pass (persistent workers carry their generators from pass to pass)."""

    def launch(exp_dir: Path, max_steps: int) -> list[list[float]]:
        SeesStream.seen = []
        config = BoringConfig(exp_dir=str(exp_dir), batch_size=4, valid_every_n_steps=None, save_every_n_seconds=None)
        SeesStream.launch(config, argv=[f"max_steps={max_steps}", f"num_dataloader_workers={workers}"])
        return SeesStream.seen

    expected = launch(tmp_path / "ref", 26)
    launch(tmp_path / "run", stop_at)
    capsys.readouterr()
    assert launch(tmp_path / "run", 26) == expected[stop_at:]
    assert "The training set (FiniteNoisyStream) has no state_dict: the resume draws again" in capsys.readouterr().err


class NoisyValidation(torch.utils.data.Dataset):
    """A validation set whose samples get noise from the global generator of the worker that reads them."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, generator=torch.Generator().manual_seed(i)) + torch.rand(4)
        return x, x.sum()


class ValidatesNoisily(MapStyle):
    def get_dataset(self, phase: mlfab.Phase) -> torch.utils.data.Dataset:
        return NoisyValidation() if phase == "valid" else ThirtyTwo()


@pytest.mark.integration
def test_validations_with_workers_after_a_resume_are_the_uninterrupted_runs(tmp_path: Path) -> None:
    """The workers of the validation set kept their generators from one validation to the next, and a resumed run's
    new ones started over: its validations drew the first validations' noise again."""

    def launch(exp_dir: Path, max_steps: int) -> list[tuple[int, float]]:
        config = BoringConfig(exp_dir=str(exp_dir), max_steps=max_steps, valid_every_n_steps=2, valid_batches=2)
        ValidatesNoisily.launch(config, argv=["num_dataloader_workers=2", "save_every_n_seconds=null"])
        return mlfab.testing.read_scalars(exp_dir / "tensorboard" / "valid")["loss/loss"]

    expected = dict(launch(tmp_path / "ref", 10))
    launch(tmp_path / "run", 5)
    resumed = {step: value for step, value in launch(tmp_path / "run", 10) if step > 5}
    assert resumed == {step: value for step, value in expected.items() if step > 5} and len(resumed) >= 2


class SizedStream(FiniteNoisyStream):
    def __init__(self) -> None:
        self.epoch = 0

    def __len__(self) -> int:
        return 30


@pytest.mark.unit
def test_the_wrapper_that_keeps_a_streams_state_passes_on_its_length_and_attributes() -> None:
    """The wrapper hid the stream's length (Lightning then refused `limit_train_batches=0.5`) and kept the attributes
    set on it for itself."""
    from mlfab.data import build_dataloader

    stream, numbers = SizedStream(), Numbered()
    for dataset in (stream, numbers):
        loader = build_dataloader(dataset, phase="train", batch_size=4, num_workers=0)
        assert len(loader.dataset) == len(dataset) and len(loader) == (8 if dataset is stream else 10)
        loader.dataset.epoch = 5
        assert dataset.epoch == 5 and loader.dataset.epoch == 5  # type: ignore[union-attr]
    with pytest.raises(TypeError):  # A stream without a length has none through the wrapper either.
        len(build_dataloader(FiniteNoisyStream(), phase="train", batch_size=4, num_workers=0).dataset)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_relaunched_with_more_epochs_goes_on_as_the_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    """After a fit that ended with its epochs (max_epochs), Lightning restores no loader state: the next epoch drew
    the first epoch's order again, and `last.ckpt` held the random states after the final validation."""

    def launch(exp_dir: Path, epochs: int) -> dict[int, float]:
        MapStyle.losses = {}
        config = BoringConfig(exp_dir=str(exp_dir), max_steps=None, valid_every_n_steps=3, save_every_n_seconds=None)
        args = ["fit", f"--trainer.max_epochs={epochs}", f"--model.config.num_dataloader_workers={workers}"]
        NoisyEverywhere.launch(config, argv=args)  # 4 batches an epoch, noise in every phase's loss.
        return MapStyle.losses

    expected = launch(tmp_path / "ref", 4)
    assert sorted(expected) == list(range(16))
    launch(tmp_path / "run", 2)
    assert launch(tmp_path / "run", 4) == {step: expected[step] for step in range(8, 16)}


class MissingShard(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        raise FileNotFoundError("shard-0003.tar is missing")


class ReadsMissingShard(mlfab.testing.BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return MissingShard()


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_that_fails_to_start_raises_its_own_error(tmp_path: Path, workers: int) -> None:
    """Lightning's teardown raised "Please call `iter(combined_loader)` first." in its place."""
    config = BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=2)
    with pytest.raises(FileNotFoundError, match="shard-0003.tar is missing"):
        ReadsMissingShard.launch(config, argv=[f"num_dataloader_workers={workers}"])


class CountsEpochs(MapStyle):
    epochs: dict[int, int] = {}

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        if state.phase == "train":
            CountsEpochs.epochs[state.num_steps] = self.current_epoch
        return super().get_loss(batch, state)


@pytest.mark.integration
def test_a_resume_at_an_epochs_end_counts_the_epochs_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """Lightning ran the finished epoch once more, empty, and counted it: every later epoch was one ahead, and a
    `max_epochs` ended the run an epoch early."""

    def launch(exp_dir: Path, max_steps: int) -> tuple[dict[int, int], dict[int, float]]:
        CountsEpochs.epochs, MapStyle.losses = {}, {}
        config = BoringConfig(exp_dir=str(exp_dir), max_steps=max_steps, valid_every_n_steps=None)
        CountsEpochs.launch(config, argv=["fit", "--model.config.save_every_n_seconds=null", "--trainer.max_epochs=3"])
        return CountsEpochs.epochs, MapStyle.losses

    epochs, losses = launch(tmp_path / "ref", 100)  # 4 batches an epoch: max_epochs ends it at 12 steps.
    assert sorted(epochs) == list(range(12)) and epochs[11] == 2
    launch(tmp_path / "run", 4)  # At the first epoch's end.
    assert launch(tmp_path / "run", 100) == ({s: epochs[s] for s in range(4, 12)}, {s: losses[s] for s in range(4, 12)})


@pytest.mark.integration
def test_resumes_chained_through_validation_steps_and_periodic_checkpoints_draw_the_uninterrupted_runs_numbers(
    tmp_path: Path,
) -> None:
    """A fit ending on a step that validates anyway saved the random states from before that validation; a resumed
    fit's periodic checkpoints saved the random states it resumed with."""

    def launch(exp_dir: Path, max_steps: int) -> dict[int, float]:
        MapStyle.losses = {}
        config = BoringConfig(exp_dir=str(exp_dir), max_steps=max_steps, valid_every_n_steps=2, save_every_n_steps=3)
        NoisyEverywhere.launch(config, argv=["save_every_n_seconds=null"])
        return MapStyle.losses

    expected = launch(tmp_path / "ref", 12)
    launch(tmp_path / "run", 4)  # Ends on a step the cadence validates at (2, 4, ...).
    assert launch(tmp_path / "run", 8) == {step: expected[step] for step in range(4, 8)}
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):  # A crash: only the resumed fit's step 6 is left.
        if ckpt.name != "step_00000006.ckpt":
            ckpt.unlink()
    assert launch(tmp_path / "run", 12) == {step: expected[step] for step in range(6, 12)}
