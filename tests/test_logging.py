"""Every log_* kind, read back the way a user sees it: TensorBoard's own reader, a real TensorBoard server,
stdout, and Lightning's own loggers."""

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

import mlfab
from mlfab.logs.values import Logs
from mlfab.testing import BoringConfig, BoringTask, read_images, read_scalars


class EveryKind(BoringTask):
    def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
        t = torch.linspace(0, 1, 8000)
        self.log_scalar("step_seen", float(state.num_steps))
        self.log_string("note", lambda: f"valid at {state.num_steps}")
        self.log_image("chw", torch.rand(3, 20, 40))
        self.log_labeled_image("one", (torch.rand(16, 16), "a label"))
        self.log_images("grid", torch.rand(5, 8, 8), keep_resolution=True, sep=1)
        self.log_labeled_images("captioned", (torch.rand(4, 1, 8, 8), ["a", "b", "c", "a much longer caption"]))
        self.log_audio("tone", torch.sin(2 * torch.pi * 440 * t), sample_rate=8000)
        self.log_audios("tones", torch.stack([torch.sin(2 * torch.pi * f * t) for f in (220, 880)]), sample_rate=8000)
        self.log_video("clip", torch.rand(30, 3, 16, 16), fps=30, target_fps=10)
        self.log_videos("clips", torch.rand(2, 10, 16, 16, 3), fps=10)
        self.log_histogram("weights", self.layer.weight)
        self.log_point_cloud("cloud", torch.rand(500, 3), max_points=100)


@pytest.mark.integration
def test_every_kind_reaches_tensorboard(tmp_path: Path) -> None:
    EveryKind.launch(BoringConfig(max_steps=4, valid_every_n_steps=2, run_dir=str(tmp_path)), argv=[])
    (exp,) = (tmp_path / "every_kind").iterdir()
    valid_dir = exp / "tensorboard" / "valid"
    acc = EventAccumulator(str(valid_dir), size_guidance={"images": 0, "audio": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()

    assert [e.step for e in acc.Scalars("value/step_seen")] == [1, 2, 4]
    assert [e.value for e in acc.Scalars("value/step_seen")] == [1.0, 2.0, 4.0]
    assert "value/note/text_summary" in tags["tensors"]

    images = read_images(valid_dir)
    assert [s for s, _ in images["value/chw"]] == [1, 2, 4]
    chw = images["value/chw"][0][1]
    assert abs(chw.shape[1] / chw.shape[0] - 2.0) < 0.05 and 250 * 250 < chw.shape[0] * chw.shape[1] < 260 * 260
    grid = images["value/grid"][0][1]
    assert grid.shape[:2] == (3 * 8 + 2, 2 * 8 + 1) or grid.shape[:2] == (2 * 8 + 1, 3 * 8 + 2)
    one = images["value/one"][0][1]
    assert one.shape[0] > one.shape[1]  # The caption strip sits under the square image.
    strip = one[one.shape[1] :]  # Below the (square) image.
    assert (strip < 100).any() and (strip > 200).mean() > 0.5  # Dark text on a light strip.
    assert "value/tone_spec" in images and "value/tones_spec" in images  # 0.2's spectrogram tags

    (tone,) = [a for a in acc.Audio("value/tone") if a.step == 1]
    assert tone.sample_rate == 8000 and tone.length_frames == 8000
    (tones,) = [a for a in acc.Audio("value/tones") if a.step == 1]
    assert tones.length_frames == 2 * 8000  # Two clips back to back (sep_ms=0, 0.2's default).

    clip = Image.open(io.BytesIO([e for e in acc.Images("value/clip")][0].encoded_image_string))
    assert clip.format == "GIF" and clip.n_frames == 10  # 30 frames at 30 fps resampled to 10 fps.
    clips = Image.open(io.BytesIO(acc.Images("value/clips")[0].encoded_image_string))
    assert clips.n_frames == 10 and clips.size[0] > 16

    histogram = acc.Histograms("value/weights")
    assert [h.step for h in histogram] == [1, 2, 4] and histogram[0].histogram_value.num == 4
    assert any(tag.startswith("value/cloud") for tag in tags["tensors"])


@pytest.mark.integration
def test_callables_run_only_on_written_steps_and_once_per_step(tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting(BoringTask):
        def set_loggers(self) -> None:
            # Two loggers that both write only their first line of each phase, and the last step.
            self.add_logger(
                mlfab.StdoutLogger(log_interval_seconds=1e6),
                mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=1e6),
            )

        def log_train_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            self.log_scalar("expensive", lambda: calls.append(state.num_steps) or 1.0)

    Counting.launch(BoringConfig(max_steps=30, valid_every_n_steps=None, run_dir=str(tmp_path)), argv=[])
    assert calls == [0, 29]
    (exp,) = (tmp_path / "counting").iterdir()
    assert [s for s, _ in read_scalars(exp / "tensorboard" / "train")["value/expensive"]] == [0, 29]


@pytest.mark.integration
def test_lightning_csv_logger_gets_scalars_and_one_warning_per_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from mlfab.loggers import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())  # Once per process: an earlier test may have warned already.

    class WithImage(BoringTask):
        def log_train_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            self.log_image("picture", torch.rand(8, 8))

    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(
        max_steps=6,
        logger=logger,
        log_every_n_steps=2,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.warns(UserWarning, match="CSVLogger cannot show logged image values") as record:
        trainer.fit(WithImage(BoringConfig()))
    assert sum("cannot show logged image" in str(w.message) for w in record) == 1
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/loss/loss" in lines[0].split(",")
    # The first, Lightning's every 2nd (1, 3: its own values' steps), and the last.
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "3", "5"]


@pytest.mark.unit
def test_stdout_plain_lines_without_escape_codes() -> None:
    out = io.StringIO()
    logger = mlfab.StdoutLogger(stream=out, tty=False)
    logger.write(Logs("train", 0, 100, 0.0, 0, {"scalar": {"loss/loss": 1.5}}))
    logger.write(Logs("train", 10, 100, 1.0, 0, {"scalar": {"loss/loss": 0.25}}))
    logger.write(Logs("valid", 10, 100, 1.0, 0, {"scalar": {"loss/loss": 0.5}}))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[train] step 0/100 | loss/loss=1.5"
    # 10 steps in 1 s of training time; steps 11-99 are left (the step written is step 10, counted from 0).
    assert lines[1] == "[train] step 10/100 | 10.0 steps/s | ETA 0:00:09 | loss/loss=0.25"
    assert lines[2] == "[valid] step 10/100 | loss/loss=0.5"
    assert "\033" not in out.getvalue() and "\r" not in out.getvalue()


@pytest.mark.integration
def test_stdout_speed_and_eta_are_the_diagnostics_written_at_the_same_step(tmp_path: Path) -> None:
    """The terminal measured steps/s between its own last two writes: a window with a validation in it showed a
    fraction of the training speed, the others none of the validations, so the ETA jumped between far too long and
    0:00:00 and disagreed with `speed/steps_per_second` and `time/remaining_s` in the files."""
    out = io.StringIO()

    class Both(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(
                mlfab.StdoutLogger(log_interval_seconds=0, stream=out, tty=False),
                mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0),
            )

        def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            time.sleep(0.2)  # A validation much longer than a step.

    Both.launch(BoringConfig(max_steps=12, valid_every_n_steps=4, valid_batches=1, exp_dir=str(tmp_path)), argv=[])
    written = [json.loads(line) for line in (tmp_path / "json" / "log.jsonl").read_text().splitlines()]
    files = {j["step"]: j["scalars"] for j in written if j.get("phase") == "train"}
    shown = 0
    for line in out.getvalue().splitlines():
        if line.startswith("[train] step ") and "steps/s" in line:
            step = int(line.split()[2].split("/")[0])
            rate, eta = files[step]["speed/steps_per_second"], files[step]["time/remaining_s"]
            h, m, sec = (int(x) for x in line.split("ETA ")[1].split(" ")[0].split(":"))
            assert f"| {rate:.1f} steps/s |" in line and h * 3600 + m * 60 + sec == round(eta), line
            shown += 1
    assert shown >= 10


@pytest.mark.unit
def test_stdout_live_line_on_a_terminal() -> None:
    out = io.StringIO()
    logger = mlfab.StdoutLogger(stream=out, tty=True)
    logger.write(Logs("train", 1, None, 0.0, 0, {"scalar": {"loss/loss": 1.0}}))
    logger.write(Logs("train", 2, None, 0.0, 0, {"scalar": {"loss/loss": 0.5}}))
    logger.write(Logs("valid", 2, None, 0.0, 0, {"scalar": {"loss/loss": 0.7}}))
    text = out.getvalue()
    assert text.startswith("\r\033[K[train] step 1 | loss/loss=1")
    assert "\r\033[K[train] step 2" in text and text.endswith("\n[valid] step 2 | loss/loss=0.7\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_tensorboard_server_lists_scalar_and_image_tags(tmp_path: Path) -> None:
    EveryKind.launch(BoringConfig(max_steps=2, valid_every_n_steps=2, run_dir=str(tmp_path)), argv=[])
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        scalars = images = {}
        while time.monotonic() < deadline:
            try:
                base = f"http://127.0.0.1:{port}/data/plugin"
                scalars = json.loads(urllib.request.urlopen(f"{base}/scalars/tags", timeout=5).read())
                images = json.loads(urllib.request.urlopen(f"{base}/images/tags", timeout=5).read())
                if any("valid" in run for run in scalars) and any("valid" in run for run in images):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        valid_run = next(run for run in scalars if run.endswith("tensorboard/valid"))
        assert "loss/loss" in scalars[valid_run] and "value/step_seen" in scalars[valid_run]
        assert "value/chw" in images[valid_run] and "value/one" in images[valid_run]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.integration
def test_bad_image_shape_names_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class BadImage(BoringTask):
        def log_train_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            self.log_image("broken", np.zeros((2, 5, 5, 5)))

    BadImage.launch(BoringConfig(max_steps=1, run_dir=str(tmp_path)), argv=[])  # Skipped: training goes on.
    (record,) = [r for r in caplog.records if "log_image('broken'" in r.getMessage()]
    assert "could not be written at step 0 and is skipped" in record.getMessage()
    assert "log_image('broken'): cannot read an image of shape (2, 5, 5, 5)" in record.getMessage()


@pytest.mark.integration
def test_run_info_reaches_tensorboard_once(tmp_path: Path) -> None:
    BoringTask.launch(BoringConfig(max_steps=2, run_dir=str(tmp_path)), argv=[])
    (exp,) = (tmp_path / "boring_task").iterdir()
    acc = EventAccumulator(str(exp / "tensorboard" / "train"), size_guidance={"tensors": 0})
    acc.Reload()

    def text(tag: str) -> str:
        (event,) = acc.Tensors(f"run/{tag}/text_summary")
        return event.tensor_proto.string_val[0].decode()

    assert "batch_size: 8" in text("config")
    assert "class BoringTask(mlfab.Task[BoringConfig])" in text("source")
    assert "torch" in text("provenance")
    in_git = (Path(mlfab.__file__).parents[1] / ".git").exists()  # A clone, or an unpacked source archive.
    assert ("commit:" if in_git else "not in a git repository") in text("git_diff")


class Forty(torch.utils.data.Dataset):
    """40 samples: 5 batches of 8 per epoch, so with 2 batches per step every epoch ends on a partial step."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return x, np.float32(x.sum())


@pytest.mark.integration
def test_every_optimizer_step_is_written_once_and_phases_do_not_mix(tmp_path: Path) -> None:
    class PartialSteps(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0))

        def get_dataset(self, phase: mlfab.Phase) -> Forty:
            return Forty()

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            self.log_scalar("is_train", 1.0 if state.phase == "train" else 0.0)
            return super().get_loss(batch, state)

    # Lightning steps at batches 2, 4, 5 (the epoch's last), 7, 9, 10, ...; validation comes every 2 batches,
    # so it also starts half-way through a step.
    config = BoringConfig(
        max_steps=6, batches_per_step=2, valid_every_n_steps=1, valid_batches=1, run_dir=str(tmp_path)
    )
    PartialSteps.launch(config, argv=[])
    (exp,) = (tmp_path / "partial_steps").iterdir()
    train = read_scalars(exp / "tensorboard" / "train")
    valid = read_scalars(exp / "tensorboard" / "valid")
    assert [step for step, _ in train["loss/loss"]] == [0, 1, 2, 3, 4, 5]
    assert {v for _, v in train["value/is_train"]} == {1.0}
    assert valid["value/is_train"] and {v for _, v in valid["value/is_train"]} == {0.0}


@pytest.mark.unit
def test_terminal_rate_without_diagnostics_leaves_a_validation_out() -> None:
    """`elapsed_time_s` is wall-clock time, validation included: measured from the last training line, a window with
    a 10 s validation in it showed 0.9 steps/s and an ETA of 0:01:28 for training running at 10 steps/s."""
    out = io.StringIO()
    logger = mlfab.StdoutLogger(stream=out, tty=False)
    logger.write(Logs("train", 0, 100, 1.0, 8, {"scalar": {"loss/loss": 1.0}}))
    logger.write(Logs("train", 9, 100, 2.0, 80, {"scalar": {"loss/loss": 1.0}}))  # 9 steps (1-9) in 1 s.
    logger.write(Logs("valid", 10, 100, 12.0, 80, {"scalar": {"loss/loss": 1.0}}))  # 10 steps done, 10 s later.
    logger.write(Logs("train", 19, 100, 13.0, 160, {"scalar": {"loss/loss": 1.0}}))  # Steps 10-19 in 1 s.
    assert out.getvalue().splitlines() == [
        "[train] step 0/100 | loss/loss=1",
        "[train] step 9/100 | 9.0 steps/s | ETA 0:00:10 | loss/loss=1",  # Steps 10-99 left.
        "[valid] step 10/100 | loss/loss=1",
        "[train] step 19/100 | 10.0 steps/s | ETA 0:00:08 | loss/loss=1",  # Steps 20-99 left.
    ]


@pytest.mark.integration
def test_terminal_rate_without_diagnostics_is_the_training_speed_in_a_run(tmp_path: Path) -> None:
    out = io.StringIO()

    class SlowValidation(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.StdoutLogger(log_interval_seconds=0, stream=out, tty=False))

        def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            time.sleep(0.5)  # Each window with a validation in it ran at under 2 steps/s.

    config = BoringConfig(max_steps=9, valid_every_n_steps=3, valid_batches=1, diagnostics=[], exp_dir=str(tmp_path))
    SlowValidation.launch(config, argv=[])
    rates = [float(r) for r in re.findall(r"^\[train\] .*\| ([\d.]+) steps/s \|", out.getvalue(), re.MULTILINE)]
    assert len(rates) == 8 and min(rates) > 5, out.getvalue()  # A step of this task takes milliseconds.


# ---------------------------------------------------------------------------------------------------------------------
# log_interval_seconds={"valid": ...}
