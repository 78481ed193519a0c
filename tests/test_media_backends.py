"""What the file loggers show for media edge cases: a key logged as two kinds, keys with special characters, point
clouds of three clouds, PIL float/int images, text in TensorBoard, 1-pixel images and video timing in W&B."""

import io
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util

import mlfab
from mlfab.loggers.json import JsonLogger
from mlfab.loggers.wandb import WandbLogger
from mlfab.logs.api import LogMethods
from mlfab.logs.buffer import LogBuffer
from mlfab.logs.media import forget_warnings
from mlfab.logs.values import Logs
from mlfab.testing import read_images
from tests.test_loggers_wandb_json import (  # noqa: F401 (the fixture keeps W&B offline and out of the home dir)
    finished_wandb_run,
    read_lines,
    wandb_history,
    wandb_offline_and_contained,
)

pytestmark = pytest.mark.unit


class Calls(LogMethods):
    """The `log_*` methods of a task, collected into one write's `Logs` as the task's buffer does."""

    def __init__(self) -> None:
        self.buffer = LogBuffer("train")

    def _log(self, kind: str, key: str, value: Any, namespace: str | None) -> None:
        self.buffer.add(kind, f"{namespace or 'value'}/{key}", value)

    def logs(self, step: int = 5) -> Logs:
        return Logs("train", step, None, 0.0, 0, self.buffer.resolve(step))


def wandb_row(exp: Path, logs: Logs) -> tuple[Path, dict[str, Any]]:
    logger = WandbLogger(exp)
    logger.write(logs)
    logger.finalize("success")
    run_dir = finished_wandb_run(exp)
    return run_dir, wandb_history(run_dir)[0]


def json_line(exp: Path, logs: Logs) -> dict[str, Any]:
    logger = JsonLogger(exp)
    logger.write(logs)
    logger.finalize("success")
    return read_lines(logger.path)[-1]


def gif_durations(gif: Image.Image) -> list[int]:
    durations = []
    for frame in range(gif.n_frames):
        gif.seek(frame)
        durations.append(gif.info["duration"])
    return durations


def test_a_key_logged_as_two_kinds_keeps_both_in_wandb_and_json(tmp_path: Path) -> None:
    calls = Calls()
    calls.log_scalar("w", 7.5)
    calls.log_histogram("w", np.arange(6.0))
    calls.log_image("sample", np.zeros((4, 4, 3), np.uint8), keep_resolution=True)
    calls.log_audio("sample", np.zeros(800, np.float32), sample_rate=8000, log_spec=False)
    calls.log_histogram("cloud", np.arange(3.0))
    calls.log_point_cloud("cloud", np.ones((5, 3)))  # Both .npy files: the second must not overwrite the first.
    logs = calls.logs()

    _, row = wandb_row(tmp_path / "task" / "run_0", logs)
    assert row["train/value/w"] == 7.5  # The first kind keeps the name...
    assert row["train/value/w/histogram/_type"] == "histogram"  # ...the later one is <tag>/<kind>.
    assert row["train/value/sample/_type"] == "image-file"
    assert row["train/value/sample/audio/_type"] == "audio-file"
    assert row["train/value/cloud/point_cloud/_type"] == "object3D-file"

    line = json_line(tmp_path, logs)
    media = line["media"]
    assert media["value/sample"].endswith(".png") and media["value/sample/audio"].endswith(".wav")
    assert np.load(tmp_path / "json" / media["value/cloud"]).tolist() == [0.0, 1.0, 2.0]
    assert np.load(tmp_path / "json" / media["value/cloud/point_cloud"]).shape == (5, 3)
    assert line["scalars"] == {"value/w": 7.5} and line["histograms"]["value/w"]["count"] == 6


def test_an_image_and_a_video_of_one_key_are_both_shown_in_tensorboard(tmp_path: Path) -> None:
    """TensorBoard shows a video as an animated image: under the image's tag, the later one hid the other."""
    calls = Calls()
    calls.log_image("sample", np.full((4, 4, 3), 255, np.uint8), keep_resolution=True)
    frames = np.zeros((3, 6, 5, 3), np.uint8)  # THWC (a 4-pixel-high one would read as TCHW with alpha).
    frames[1, ..., 0] = frames[2] = 255  # Black, red, white.
    calls.log_video("sample", frames, fps=4)
    logger = mlfab.TensorboardLogger(tmp_path)
    logger.write(calls.logs())
    logger.finalize("success")
    images = read_images(tmp_path / "tensorboard" / "train")
    assert sorted(images) == ["value/sample", "value/sample/video"]
    assert images["value/sample"][0][1].shape == (4, 4, 3) and images["value/sample"][0][1].min() == 255
    video = images["value/sample/video"][0][1]  # RGB frames, not the GIF's palette indices.
    assert video.shape == (3, 6, 5, 3) and video[:, 0, 0].tolist() == [[0, 0, 0], [255, 0, 0], [255, 255, 255]]
    logger = mlfab.TensorboardLogger(tmp_path / "still")
    still = Calls()
    still.log_video("still", frames[:1], fps=4)
    logger.write(still.logs())
    logger.finalize("success")
    (_, one), *_ = read_images(tmp_path / "still" / "tensorboard" / "train")["value/still"]
    assert one.shape == (1, 6, 5, 3)  # A video still, not an image.


def test_json_media_of_keys_differing_only_in_special_characters_do_not_collide(tmp_path: Path) -> None:
    keys = ["a b", "a_b", "x:y", "x;y", "acc.top1", "λ"]
    calls = Calls()
    for i, key in enumerate(keys):
        calls.log_image(key, np.full((4, 4, 3), 30 * i, np.uint8), keep_resolution=True)
    media = json_line(tmp_path, calls.logs(1))["media"]
    assert len(set(media.values())) == len(keys)
    for i, key in enumerate(keys):
        assert np.asarray(Image.open(tmp_path / "json" / media[f"value/{key}"]))[0, 0, 0] == 30 * i
    # Names that need no sanitising are as before.
    assert media["value/a_b"] == "media/train/value__a_b/1.png"
    assert media["value/acc.top1"] == "media/train/value__acc.top1/1.png"
    assert media["value/λ"] == "media/train/value__λ/1.png"


@pytest.mark.parametrize("batch", [2, 3])
def test_point_clouds_coordinates_first_read_right_with_three_clouds(tmp_path: Path, batch: int) -> None:
    rng = np.random.default_rng(0)
    clouds = np.stack([rng.normal(size=(50, 3)) + 10 * b for b in range(batch)]).astype(np.float32)  # (B, N, 3)
    calls = Calls()
    calls.log_point_cloud("last", clouds)
    calls.log_point_cloud("first", clouds.transpose(0, 2, 1))  # The documented (B, 3, N).
    calls.log_point_cloud("single", clouds[0].T)  # (3, N)
    media = json_line(tmp_path, calls.logs())["media"]
    last, first = (np.load(tmp_path / "json" / media[f"value/{key}"]) for key in ("last", "first"))
    np.testing.assert_array_equal(first, last)
    np.testing.assert_allclose(last[:50, :3].mean(0), clouds[0].mean(0), rtol=1e-5)  # Cloud 0 is centred near 0.
    np.testing.assert_array_equal(np.load(tmp_path / "json" / media["value/single"]), clouds[0])


def test_pil_float_and_16_bit_images_follow_the_array_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Integer pixels above 255 (a 16-bit depth map) are clipped, as documented, and no longer without a word."""
    floats = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    ints = np.array([[0, 100, 200, 300]], np.uint16)
    calls = Calls()
    calls.log_image("f", Image.fromarray(floats), keep_resolution=True)  # Mode "F".
    calls.log_image("i16", Image.fromarray(ints), keep_resolution=True)  # Mode "I;16".
    calls.log_image("i32", Image.fromarray(ints.astype(np.int32)), keep_resolution=True)  # Mode "I".
    calls.log_image("fine", ints.clip(0, 255), keep_resolution=True)
    forget_warnings()  # As a new task does: what an earlier test logged under these keys says nothing here.
    with caplog.at_level("WARNING", logger="mlfab.logs.media"):
        media = json_line(tmp_path, calls.logs())["media"]
        json_line(tmp_path / "again", calls.logs(6))  # Once per call and key.
    said = "integer values from 0 to 300 are clipped to [0, 255]; pass floats (or divide by the largest value) to see"
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"log_image({key!r}): {said} the whole range (said once)" for key in ("i16", "i32")
    ]

    def gray(key: str) -> list[int]:
        return np.asarray(Image.open(tmp_path / "json" / media[f"value/{key}"]))[0, :, 0].tolist()

    assert gray("f") == [0, 64, 128, 255]  # As the float array: [0, 1] maps to black..white.
    assert gray("i16") == gray("i32") == [0, 100, 200, 255]  # As integer arrays: clipped to [0, 255].


def test_nan_and_inf_in_logged_media_are_drawn_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A NaN pixel came out black and a NaN sample silent without a word: a model's NaN output looked like data."""
    pixels = np.array([[0.0, np.nan, 0.5, np.inf, -np.inf, 1.0]], np.float32)
    clip = np.array([0.5, np.nan, -0.5, 0.25], np.float32)
    calls = Calls()
    calls.log_image("nan_image", pixels, keep_resolution=True)
    calls.log_image("fine_image", pixels[:, [0, 2, 5]], keep_resolution=True)
    calls.log_audio("nan_clip", clip)
    calls.log_histogram("nan_histogram", clip)
    calls.log_histogram("all_nan_histogram", np.full(3, np.nan))
    calls.log_point_cloud("nan_cloud", np.array([[0.0, np.nan, 1.0], [0.0, 0.0, 1.0]], np.float32))
    forget_warnings()
    with caplog.at_level("WARNING", logger="mlfab.logs.media"):
        media = json_line(tmp_path, calls.logs())["media"]
        json_line(tmp_path / "again", calls.logs(6))  # Once per call and key.
    gray = np.asarray(Image.open(tmp_path / "json" / media["value/nan_image"]))[0, :, 0].tolist()
    assert gray == [0, 0, 128, 255, 0, 255]
    assert sorted(r.getMessage() for r in caplog.records) == [
        "log_audio('nan_clip'): 1 of 4 values are NaN or infinite: played as silence (said once)",
        "log_histogram('all_nan_histogram'): 3 of 3 values are NaN or infinite: no histogram for TensorBoard and W&B "
        "(said once)",
        "log_histogram('nan_histogram'): 1 of 4 values are NaN or infinite: left out of the bins (said once)",
        "log_image('nan_image'): 3 of 6 values are NaN or infinite: drawn black (NaN, -inf) and white (+inf) "
        "(said once)",
        "log_point_cloud('nan_cloud'): 1 of 6 values are NaN or infinite: kept (viewers place or drop such points as "
        "they do) (said once)",
        "log_spectrogram('nan_clip_spec'): 1 of 4 values are NaN or infinite: played as silence (said once)",
    ]


def text_rendered(event_dir: Path, tag: str) -> str:
    acc = EventAccumulator(str(event_dir), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return text_plugin.text_array_to_html(tensor_util.make_ndarray(event.tensor_proto), enable_markdown=True)


def test_tensorboard_shows_a_logged_string_verbatim(tmp_path: Path) -> None:
    code = "def f(x):\n    return x * 2  # a<b>, __init__"
    fenced = "text:\n```\nprint(1)\n```\nend"
    logger = mlfab.TensorboardLogger(tmp_path)
    logger.write(Logs("train", 0, None, 0.0, 0, {"string": {"value/code": code, "value/fenced": fenced}}))
    logger.finalize("success")
    train = tmp_path / "tensorboard" / "train"
    shown = text_rendered(train, "value/code")
    assert "<pre><code>def f(x):\n    return x * 2  # a&lt;b&gt;, __init__\n</code></pre>" in shown
    assert "<pre><code>text:\n```\nprint(1)\n```\nend\n</code></pre>" in text_rendered(train, "value/fenced")


def test_tensorboard_prefix_names_the_run_texts_too(tmp_path: Path) -> None:
    logger = mlfab.TensorboardLogger(tmp_path, prefix="exp1")
    logger.write_run_info({"config": "a: 1", "provenance": "commit abc"})
    logger.finalize("success")
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"exp1-run/config/text_summary", "exp1-run/provenance/text_summary"}


def test_wandb_keeps_the_shape_of_a_one_pixel_tall_image(tmp_path: Path) -> None:
    calls = Calls()
    calls.log_image("strip", np.linspace(0, 1, 8)[None, :], keep_resolution=True)  # (1, 8)
    run_dir, row = wandb_row(tmp_path / "task" / "run_0", calls.logs())
    stored = np.asarray(Image.open(run_dir / "files" / row["train/value/strip/path"]))
    assert stored.shape == (1, 8, 3)
    assert stored[0, :, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]


def test_video_durations_match_the_frame_rate_in_gif_and_wandb_mp4(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8, 3), 20 * i, np.uint8) for i in range(12)])
    calls = Calls()
    calls.log_video("second", frames)  # 12 frames shown at 12 fps: 1 s.
    calls.log_video("len4", frames[:10], length=4.0)  # 10 frames over 4 s: 2.5 fps.
    calls.log_video("seven", frames[:7])  # 7 frames at 12 fps.
    logs = calls.logs()

    media = json_line(tmp_path, logs)["media"]
    second = gif_durations(Image.open(tmp_path / "json" / media["value/second"]))
    assert sum(second) == 1000 and set(second) == {80, 90}
    assert sum(gif_durations(Image.open(tmp_path / "json" / media["value/len4"]))) == 4000

    run_dir, row = wandb_row(tmp_path / "task" / "run_0", logs)
    for key, count, fps in (("second", 12, 12.0), ("len4", 10, 2.5), ("seven", 7, 12.0)):
        reader = imageio_ffmpeg.read_frames(str(run_dir / "files" / row[f"train/value/{key}/path"]))
        meta = next(reader)
        decoded = [np.frombuffer(frame, np.uint8)[0] for frame in reader]
        assert meta["fps"] == fps and len(decoded) == count, key
        assert np.abs(np.array(decoded, int) - 20 * np.arange(count)).max() <= 3, key  # Every frame, in order.


def test_gif_bytes_run_time_tracks_the_frame_rate() -> None:
    from mlfab.logs.media import gif_bytes

    frames = np.zeros((30, 2, 2, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(30)  # Distinct frames, so Pillow keeps each one.
    for fps, total in ((12, 2500), (7, 4290), (24, 1250), (60, 600)):
        durations = gif_durations(Image.open(io.BytesIO(gif_bytes(frames, fps))))
        assert abs(sum(durations) - total) <= 5 and min(durations) >= 20, (fps, durations)
