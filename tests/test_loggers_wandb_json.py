"""WandbLogger (offline, read back from its run files) and JsonLogger (read back line by line), every kind."""

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

import mlfab
from mlfab.loggers.json import JsonLogger
from mlfab.loggers.wandb import WandbLogger, resolve_mode
from mlfab.logs.values import Audio, Logs, PointCloud, Video
from mlfab.testing import BoringConfig, BoringTask


@pytest.fixture(scope="module", autouse=True)
def wandb_offline_and_contained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """W&B never goes online here, whatever the environment says, and writes nothing into the real home.

    Module-scoped: W&B's background service keeps the environment of its first run, and warns if it changes.
    """
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        for var, name in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            mp.setenv(var, str(home / name))
        yield


def every_kind(phase: mlfab.Phase, step: int, loss: float) -> Logs:
    rng = np.random.default_rng(step)
    frames = np.stack([np.full((5, 7, 3), 40 * i, dtype=np.uint8) for i in range(4)])  # Distinct frames.
    return Logs(
        phase,
        step,
        10,
        elapsed_time_s=1.5 * step,
        num_samples=8 * step,
        values={
            "scalar": {"loss/loss": loss},
            "string": {"text/sample": "a < b\n  & c"},
            "image": {"image/x": rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)},
            "audio": {"audio/stereo": Audio(rng.uniform(-1, 1, (400, 2)).astype(np.float32), 8000)},
            "video": {"video/clip": Video(frames, fps=5)},
            "histogram": {"hist/w": np.array([1.0, 2.0, 3.0, 4.0, np.nan])},
            "point_cloud": {
                "points/pc": PointCloud(
                    rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 255, (10, 3), dtype=np.uint8)
                )
            },
        },
    )


# ---------------------------------------------------------------------------------------------------------------------
# JSON


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.unit
def test_json_logger_writes_every_kind_and_media_decode(tmp_path: Path) -> None:
    logger = JsonLogger(tmp_path)
    logger.log_hyperparams({"config": {"batch_size": 8}})
    logger.write(every_kind("train", 2, 0.5))
    logger.write(every_kind("valid", 2, 0.25))
    logger.log_metrics({"lightning/metric": 3.0, "epoch": 0}, step=3)
    root = tmp_path / "json"
    lines = read_lines(root / "log.jsonl")  # Read before finalize: every line is flushed as written.
    logger.finalize("success")

    assert lines[0] == {"phase": "hparams", "hparams": {"config": {"batch_size": 8}}}
    train, valid, metrics = lines[1:]
    assert (train["phase"], train["step"], train["elapsed_time_s"], train["num_samples"]) == ("train", 2, 3.0, 16)
    assert train["scalars"] == {"loss/loss": 0.5} and valid["scalars"] == {"loss/loss": 0.25}
    assert train["strings"] == {"text/sample": "a < b\n  & c"}
    assert train["histograms"]["hist/w"] == {
        "min": 1.0,
        "max": 4.0,
        "mean": 2.5,
        "std": pytest.approx(1.118, abs=1e-3),
        "count": 5,
    }
    assert metrics["step"] == 3 and metrics["scalars"] == {"lightning/metric": 3.0}  # "epoch" is Lightning's own.

    media = train["media"]
    assert set(media) == {"image/x", "audio/stereo", "video/clip", "hist/w", "points/pc"}
    assert media["image/x"] == "media/train/image__x/2.png"
    assert valid["media"]["image/x"] == "media/valid/image__x/2.png"  # Same step, other phase: not overwritten.
    assert Image.open(root / media["image/x"]).size == (9, 6)
    info = soundfile.info(str(root / media["audio/stereo"]))
    assert (info.samplerate, info.channels, info.frames) == (8000, 2, 400)
    gif = Image.open(root / media["video/clip"])
    assert (gif.n_frames, gif.size, gif.info["duration"]) == (4, (7, 5), 200)
    hist = np.load(root / media["hist/w"])
    assert hist.shape == (5,) and np.isnan(hist[-1])
    cloud = np.load(root / media["points/pc"])
    assert cloud.shape == (10, 6) and cloud.dtype == np.float32 and cloud[:, 3:].max() <= 255


# ---------------------------------------------------------------------------------------------------------------------
# W&B


@pytest.mark.unit
def test_mode_is_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert resolve_mode() == "offline"
    assert resolve_mode("online") == "online"  # An explicit mode wins.
    (tmp_path / ".netrc").write_text("machine example.com login user password secret\n")
    assert resolve_mode() == "offline"  # An entry for another host is no W&B credential.
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert resolve_mode() is None  # Credentials: wandb decides (online unless `wandb offline` was run).
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode() is None


def wandb_records(run_dir: Path) -> list[Any]:
    """Records of a run's `.wandb` transaction log (W&B's LevelDB-style log: 7-byte file header, 32 KiB blocks,
    each chunk with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # Too little room for a chunk header: the rest of the block is padding.
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # Zero padding up to the end of the block.
            pos += block_left
            continue
        if pos + 7 + length > len(data):  # Still being written.
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row, {key: value}, media as their nested JSON fields ({"train/image/x/path": ...})."""
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def finished_wandb_run(exp_dir: Path, timeout_s: float = 30.0) -> Path:
    """The run directory, once its transaction log ends with the exit record.

    W&B's service writes the log in the background: `run.finish()` can return a few milliseconds before the
    records reach the file.
    """
    (run_dir,) = (exp_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_dir)):
        assert time.monotonic() < deadline, f"{run_dir} has no exit record after {timeout_s} s"
        time.sleep(0.01)
    return run_dir


@pytest.mark.integration
def test_wandb_logger_offline_every_kind_in_order(tmp_path: Path) -> None:
    exp = tmp_path / "my_task" / "run_3"
    logger = WandbLogger(exp)
    assert logger.mode == "offline"  # tests/conftest.py sets WANDB_MODE=offline.
    logger.write_config("batch_size: 8\noptim:\n  lr: 0.1\n")
    logger.log_hyperparams({"config": {"batch_size": 8}})
    run = logger.experiment
    assert (run.name, run.project) == ("my_task/run_3", "mlfab")
    logger.write(every_kind("train", 0, 1.0))
    logger.write(every_kind("valid", 2, 0.5))  # Validation at the step training reached...
    logger.write(Logs("train", 2, 10, 3.0, 16, {"scalar": {"loss/loss": 0.75}}))  # ...then training at that step.
    logger.write(Logs("train", 1, 10, 4.0, 8, {"scalar": {"loss/loss": 0.9}}))  # Even a step back is kept.
    logger.log_metrics({"lightning/metric": 2.0}, step=5)  # Lightning's `self.log` path.
    logger.finalize("success")

    run_dir = finished_wandb_run(exp)
    rows = wandb_history(run_dir)
    assert [r["trainer/global_step"] for r in rows] == [0, 2, 2, 1, 5]  # One row per write, none dropped.
    assert [r.get("train/loss/loss") for r in rows] == [1.0, None, 0.75, 0.9, None]
    assert rows[1]["valid/loss/loss"] == 0.5 and rows[4]["lightning/metric"] == 2.0
    first = rows[0]
    assert first["trainer/num_samples"] == 0
    assert first["train/hist/w/_type"] == "histogram" and sum(first["train/hist/w/values"]) == 4  # NaN left out.
    kinds = {
        "image/x": "image-file",
        "audio/stereo": "audio-file",
        "video/clip": "video-file",
        "points/pc": "object3D-file",
        "text/sample": "html-file",
    }
    for phase, row in (("train", rows[0]), ("valid", rows[1])):
        for tag, kind in kinds.items():
            assert row[f"{phase}/{tag}/_type"] == kind
            assert (run_dir / "files" / row[f"{phase}/{tag}/path"]).is_file()
    files = run_dir / "files"
    assert "&lt; b\n  &amp; c" in (files / rows[0]["train/text/sample/path"]).read_text()
    assert Image.open(files / rows[0]["train/image/x/path"]).size == (9, 6)
    assert soundfile.info(str(files / rows[0]["train/audio/stereo/path"])).samplerate == 8000
    assert rows[0]["train/video/clip/path"].endswith(".mp4") and (rows[0]["train/video/clip/width"] % 2) == 0
    points = json.loads((files / rows[0]["train/points/pc/path"]).read_text())
    assert np.asarray(points).shape == (10, 6)

    records = wandb_records(run_dir)
    config: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert config["batch_size"] == 8 and config["optim"] == {"lr": 0.1} and "config" not in config
    assert (files / "mlfab_config.yaml").read_text().startswith("batch_size: 8")
    assert records[-1].WhichOneof("record_type") == "exit" and records[-1].exit.exit_code == 0


@pytest.mark.integration
def test_wandb_name_and_project_from_the_environment_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WANDB_NAME was replaced by the run directory's name without a word (WANDB_PROJECT was honoured)."""
    monkeypatch.setenv("WANDB_NAME", "from-env")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    logger = WandbLogger(tmp_path / "my_task" / "run_0")
    assert (logger.experiment.name, logger.experiment.project) == ("from-env", "env-project")
    logger.finalize("success")
    named = WandbLogger(tmp_path / "my_task" / "run_1", name="given", project="given-project")
    assert (named.experiment.name, named.experiment.project) == ("given", "given-project")  # Arguments win.
    named.finalize("success")


@pytest.mark.unit
def test_disabled_wandb_accepts_every_call_and_writes_nothing(tmp_path: Path) -> None:
    logger = WandbLogger(tmp_path / "task" / "run_0", mode="disabled")
    logger.write_config("batch_size: 8\n")
    logger.write(every_kind("train", 0, 1.0))
    logger.log_metrics({"x": 1.0}, step=1)
    logger.finalize("failed")
    assert not (tmp_path / "task" / "run_0" / "wandb").exists()


@pytest.mark.integration
def test_importing_the_wandb_logger_does_not_import_wandb() -> None:
    code = "import sys, mlfab.loggers.wandb, mlfab.loggers.json; print('wandb' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------------------
# In a real training run.


class LoggedTask(BoringTask):
    def set_loggers(self) -> None:
        super().set_loggers()
        every_step = 0.0  # Both write every training step, so each step's line and row can be checked.
        self.add_logger(
            JsonLogger(self.exp_dir, log_interval_seconds=every_step),
            WandbLogger(self.exp_dir, log_interval_seconds=every_step),
        )


@pytest.mark.integration
def test_training_writes_json_and_wandb(tmp_path: Path) -> None:
    LoggedTask.launch(BoringConfig(max_steps=4, valid_every_n_steps=2, run_dir=str(tmp_path / "runs")), argv=[])
    (exp,) = (tmp_path / "runs" / "logged_task").iterdir()

    lines = [x for x in read_lines(exp / "json" / "log.jsonl") if x["phase"] in ("train", "valid")]
    assert [x["step"] for x in lines if x["phase"] == "train"] == [0, 1, 2, 3]
    assert [x["step"] for x in lines if x["phase"] == "valid"] == [1, 2, 4]
    assert all("loss/loss" in x["scalars"] for x in lines)

    run_dir = finished_wandb_run(exp)
    rows = wandb_history(run_dir)
    train = [r["trainer/global_step"] for r in rows if "train/loss/loss" in r]
    valid = [r["trainer/global_step"] for r in rows if "valid/loss/loss" in r]
    assert (train, valid) == ([0, 1, 2, 3], [1, 2, 4])
    assert wandb_records(run_dir)[-1].WhichOneof("record_type") == "exit"  # The Trainer's finalize finished it.


@pytest.mark.unit
def test_non_finite_histograms_and_fast_videos_read_back_the_same_from_every_file_logger(tmp_path: Path) -> None:
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = every_kind("train", 0, 0.5)
    logs.values["histogram"]["hist/all_nan"] = np.full(4, np.nan)  # Once stopped training in TensorBoard.
    logs.values["video"]["video/clip"] = Video(logs.values["video"]["video/clip"].frames, fps=60)
    tb, js = mlfab.TensorboardLogger(tmp_path), JsonLogger(tmp_path)
    for logger in (tb, js):
        logger.write(logs)
        logger.finalize("success")

    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    assert events.Tags()["histograms"] == ["hist/w"]  # The NaN left out; the all-NaN histogram skipped.
    assert events.Histograms("hist/w")[0].histogram_value.num == 4
    tb_gif = Image.open(io.BytesIO(events.Images("video/clip")[0].encoded_image_string))
    (line,) = (row for row in read_lines(tmp_path / "json" / "log.jsonl") if "media" in row)
    json_gif = Image.open(tmp_path / "json" / line["media"]["video/clip"])
    # 60 fps is 16.7 ms a frame; browsers play GIF frames under 20 ms at 100 ms, so both write 20 ms.
    assert tb_gif.info["duration"] == json_gif.info["duration"] == 20
    assert np.isnan(np.load(tmp_path / "json" / line["media"]["hist/all_nan"])).all()  # JSON keeps the raw values.


@pytest.mark.unit
def test_a_log_interval_for_an_unknown_phase_is_refused_naming_the_phases() -> None:
    with pytest.raises(ValueError, match=r"got phase\(s\) 'vaild'; the phases are 'train', 'valid', 'test', 'predict'"):
        mlfab.StdoutLogger(log_interval_seconds={"vaild": 5.0})  # type: ignore[dict-item]
    logger = mlfab.StdoutLogger(log_interval_seconds={"valid": 5.0})
    assert logger.log_interval_seconds == {"train": 1.0, "valid": 5.0, "test": 0.0, "predict": 0.0}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-5, "train: -5"), (float("nan"), "train: nan"), ({"valid": None}, "valid: None"), ({"train": "5"}, "train: '5'")],
)
def test_a_log_interval_that_is_no_number_of_seconds_is_refused(seconds: object, shown: str) -> None:
    """None (a dict's phase) crashed the run at its second validation; NaN wrote nothing but the first and last."""
    with pytest.raises(
        ValueError, match=rf"JsonLogger\(log_interval_seconds=...\) got {shown}: each interval is a fin"
    ):
        mlfab.JsonLogger("unused", log_interval_seconds=seconds)  # type: ignore[arg-type]
    assert mlfab.JsonLogger("unused", log_interval_seconds=np.float32(0.5)).log_interval_seconds["train"] == 0.5


@pytest.mark.unit
def test_a_log_interval_dict_without_train_keeps_the_loggers_training_interval(tmp_path: Path) -> None:
    """`{"valid": 30}` meant to change validation alone set training's interval to 0: every step was written and
    every lazy value computed every step."""

    class Mine(mlfab.PlainLogger):
        def write(self, logs: Any) -> None:
            pass

    for logger, train in (
        (mlfab.JsonLogger(tmp_path, log_interval_seconds={"valid": 30.0}), 2.0),
        (mlfab.StdoutLogger(log_interval_seconds={"valid": 30.0}), 1.0),
        (mlfab.TensorboardLogger(tmp_path, log_interval_seconds={"valid": 30.0}), 2.0),
        (Mine({"valid": 30.0}), 2.0),
        (mlfab.JsonLogger(tmp_path, log_interval_seconds={"valid": 30.0, "train": 0.0}), 0.0),
    ):
        assert logger.log_interval_seconds == {"train": train, "valid": 30.0, "test": 0.0, "predict": 0.0}


@pytest.mark.integration
def test_a_loggers_prefix_applies_to_mlfabs_values_as_to_lightnings(tmp_path: Path) -> None:
    """`prefix=` is Lightning's logger argument: it names every tag `<prefix>-<tag>`; mlfab's own writes follow it
    (they ignored it, so a prefixed logger's metrics and mlfab's values landed under different names)."""
    from mlfab.testing import read_scalars

    tensorboard = mlfab.TensorboardLogger(tmp_path / "tb", prefix="exp1")
    tensorboard.write(Logs("train", 1, 10, 1.0, 8, {"scalar": {"loss/loss": 0.5}}))
    tensorboard.log_metrics({"lightning/metric": 2.0}, step=1)
    tensorboard.finalize("success")
    assert {"exp1-loss/loss", "exp1-lightning/metric"} <= set(read_scalars(tmp_path / "tb" / "tensorboard" / "train"))

    wandb_logger = WandbLogger(tmp_path / "wb", prefix="exp1")
    wandb_logger.write(Logs("train", 1, 10, 1.0, 8, {"scalar": {"loss/loss": 0.5}}))
    wandb_logger.log_metrics({"lightning/metric": 2.0}, step=1)
    wandb_logger.finalize("success")
    rows = wandb_history(finished_wandb_run(tmp_path / "wb"))
    assert rows[0]["exp1-train/loss/loss"] == 0.5 and rows[1]["exp1-lightning/metric"] == 2.0


@pytest.mark.unit
def test_json_media_written_twice_at_one_step_keep_a_file_each(tmp_path: Path) -> None:
    """A `validate` of the run's checkpoint writes at the step the training validated at: its image replaced the
    training's, which that line still pointed at."""
    for shade in (10, 200):
        logger = JsonLogger(tmp_path, log_interval_seconds=0)
        image = np.full((4, 4, 3), shade, dtype=np.uint8)
        logger.write(Logs("valid", 3, 3, 1.0, 8, {"image": {"value/img": image}}))
        logger.finalize("success")
    lines = [json.loads(line) for line in (tmp_path / "json" / "log.jsonl").read_text().splitlines()]
    paths = [line["media"]["value/img"] for line in lines]
    assert paths == ["media/valid/value__img/3.png", "media/valid/value__img/3-2.png"]
    assert [np.asarray(Image.open(tmp_path / "json" / p))[0, 0, 0] for p in paths] == [10, 200]
