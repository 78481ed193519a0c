"""mlfab 0.2 fidelity of the `log_*` methods: a task written for 0.2 logs with 0.2's keywords and gets 0.2's
meanings, defaults and normalisation, read back the way a user sees them (TensorBoard's event files and the JSON
logger's media files).

Two short training runs of `mlfab.testing.BoringTask` subclasses, shared by the tests of this file:
- `Defaults02` logs with no keywords (or keywords mlfab always took), so each default and normalisation of 0.2 is
  checked on its own;
- `Keywords02` passes every 0.2 keyword of every `log_*` method, as a 0.2 task would, and each keyword's effect is
  checked.
"""

import inspect
import io
import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

import mlfab
from mlfab.loggers.base import PlainLogger
from mlfab.logs.values import Logs
from mlfab.testing import BoringConfig, BoringTask, read_images

SR = 8000  # The sample rate the keyword run passes.
T_AUDIO = 4410  # Samples per clip (0.1 s at 0.2's default 44.1 kHz).


def _anti_phase(samples: int = T_AUDIO, rate: int = 44100, freq: float = 441.0) -> Tensor:
    """A stereo clip whose right channel is the left one negated: mixed down to mono it is silence."""
    tone = 0.8 * torch.sin(2 * torch.pi * freq * torch.arange(samples) / rate)
    return torch.stack([tone, -tone])


def _ramp(width: int = 64, height: int = 8) -> Tensor:
    """A horizontal gray ramp from -1 (left) to 1 (right), (1, H, W)."""
    return torch.linspace(-1, 1, width)[None, None].expand(1, height, width).clone()


def _numbered(count: int, size: int = 8) -> Tensor:
    """uint8 images (B, size, size), image i filled with 20 * i, so a tile tells which image it is."""
    return (torch.arange(count, dtype=torch.uint8) * 20)[:, None, None].expand(count, size, size).clone()


def _color(i: int) -> tuple[int, int, int]:
    return (20 * i + 10, 200 - 20 * i, 50)


def _colored(count: int, size: int = 32) -> Tensor:
    """uint8 RGB images (B, 3, size, size), image i in `_color(i)`: no caption pixel (gray) can be mistaken for it."""
    colors = torch.tensor([_color(i) for i in range(count)], dtype=torch.uint8)
    return colors[:, :, None, None].expand(count, 3, size, size).clone()


# ---------------------------------------------------------------------------------------------------------------------
# The runs


class Defaults02(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(
            mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0),
            mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0),
        )

    def log_train_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
        self.log_audio("anti", _anti_phase())
        self.log_audios("anti_batch", lambda: torch.stack([_anti_phase()] * 3))

    def log_valid_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
        self.log_image("ramp", _ramp(), keep_resolution=True)
        self.log_images("pair", torch.stack([torch.full((8, 8), -1.0), torch.zeros(8, 8)]), keep_resolution=True)
        self.log_images("numbered", _numbered(10), max_images=4, keep_resolution=True)
        self.log_labeled_image("caption", (torch.full((64, 64), 255, dtype=torch.uint8), "hi"), keep_resolution=True)
        # Each frame a horizontal ramp: [-3, 3] first (the noise a denoising video starts from), then growing from
        # nothing to [-1, 1] at the last frame.
        ramp = torch.linspace(-1, 1, 8).expand(8, 8)
        self.log_video("gray", torch.stack([3 * ramp] + [ramp * t / 14 for t in range(1, 15)]))
        self.log_video("rgb", torch.rand(30, 3, 8, 8))
        t = torch.arange(SR) / SR
        two_tones = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 3000 * t)])
        self.log_spectrogram("two_tones", two_tones, sample_rate=SR)
        self.log_point_cloud("cloud", torch.rand(5000, 3))


class Keywords02(Defaults02):
    def log_train_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
        pass

    def log_valid_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
        t = torch.arange(SR // 2) / SR
        tone = torch.sin(2 * torch.pi * 500 * t)
        self.log_scalar("scalar", 1.5, namespace="kw")
        self.log_string("string", "hello", namespace="kw")
        self.log_image("image", _ramp(), namespace="kw", keep_resolution=False)
        label = "a fairly long caption"
        self.log_labeled_image(
            "narrow", (torch.ones(3, 64, 64), label), namespace="kw", max_line_length=4, keep_resolution=True
        )
        self.log_labeled_image(
            "left",
            (torch.ones(3, 64, 64), label),
            namespace="kw",
            max_line_length=None,
            keep_resolution=True,
            centered=False,
        )
        self.log_images("grid", _numbered(10), namespace="kw", keep_resolution=True, max_images=4, sep=3)
        self.log_labeled_images(
            "labeled_grid",
            (_colored(6), [f"image {i}" for i in range(6)]),
            namespace="kw",
            max_line_length=8,
            keep_resolution=True,
            max_images=3,
            sep=1,
            centered=True,
        )
        self.log_audio(
            "audio",
            torch.stack([tone, torch.zeros_like(tone)]),
            namespace="kw",
            sample_rate=SR,
            log_spec=True,
            n_fft_ms=32.0,
            hop_length_ms=8.0,
            channel_select_mode="last",
            keep_resolution=True,
        )
        self.log_audios(
            "audios",
            torch.stack([torch.stack([tone, -tone]) * (i + 1) / 3 for i in range(3)]),
            namespace="kw",
            sep_ms=50.0,
            max_audios=2,
            sample_rate=SR,
            log_spec=True,
            n_fft_ms=64.0,
            hop_length_ms=None,
            channel_select_mode="mean",
            spec_sep=4,
            keep_resolution=True,
        )
        self.log_audio("no_spec", tone, namespace="kw", sample_rate=SR, log_spec=False)
        self.log_spectrogram(
            "spectrogram",
            tone,
            namespace="kw",
            sample_rate=SR,
            n_fft_ms=32.0,
            hop_length_ms=16.0,
            channel_select_mode="first",
            keep_resolution=True,
        )
        self.log_spectrograms(
            "spectrograms",
            torch.stack([tone, tone, tone]),
            namespace="kw",
            max_audios=2,
            sample_rate=SR,
            n_fft_ms=32.0,
            hop_length_ms=8.0,
            channel_select_mode="mean",
            spec_sep=2,
            keep_resolution=True,
        )
        self.log_video("timed", torch.rand(24, 3, 8, 8), namespace="kw", fps=24, length=None)
        self.log_video("by_length", torch.rand(20, 8, 8, 3), namespace="kw", fps=None, length=5.0)
        frames = [torch.full((3, 1, 8, 8), i / 4) for i in range(5)]  # 0.2's list: 5 time steps of a batch of 3
        self.log_videos("videos", frames, namespace="kw", max_videos=2, sep=1, fps=None, length=None)
        self.log_videos("videos_timed", torch.rand(2, 24, 8, 8), namespace="kw", fps=24, length=None)
        self.log_histogram("histogram", torch.randn(100), namespace="kw")
        self.log_point_cloud(
            "cloud", torch.rand(2, 3, 500), namespace="kw", max_points=100, colors=torch.rand(2, 3, 500)
        )


def _launch(task: type[BoringTask], root: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # What tests/conftest.py does per test, for this module's runs.
        mp.setenv("MLFABRC_PATH", str(root / "home" / ".mlfab.yml"))
        for var in ("RUN_DIR", "DATA_DIR", "MODEL_DIR"):
            mp.delenv(var, raising=False)
        (root / "work").mkdir()
        mp.chdir(root / "work")
        task.launch(BoringConfig(max_steps=2, valid_every_n_steps=None, valid_batches=1, run_dir=str(root)), argv=[])
    (exp,) = [p for p in root.glob("*/run_*") if p.is_dir()]
    return exp


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _launch(Defaults02, tmp_path_factory.mktemp("defaults02"))


@pytest.fixture(scope="module")
def keywords_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _launch(Keywords02, tmp_path_factory.mktemp("keywords02"))


# ---------------------------------------------------------------------------------------------------------------------
# Reading back


def _events(exp: Path, phase: str) -> EventAccumulator:
    acc = EventAccumulator(str(exp / "tensorboard" / phase), size_guidance={"images": 0, "audio": 0, "tensors": 0})
    acc.Reload()
    return acc


def _first_image(exp: Path, phase: str, tag: str) -> np.ndarray:
    return read_images(exp / "tensorboard" / phase)[tag][0][1]


def _gif_frames(data: bytes) -> tuple[list[np.ndarray], list[int]]:
    gif = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
        durations.append(int(gif.info["duration"]))
    return frames, durations


def _tb_gif(exp: Path, tag: str) -> tuple[list[np.ndarray], list[int]]:
    return _gif_frames(_events(exp, "valid").Images(tag)[0].encoded_image_string)


def _wav(data: bytes) -> tuple[np.ndarray, int]:
    """(samples as float (T, C), sample rate) of a 16-bit WAV."""
    with wave.open(io.BytesIO(data)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return pcm / 32768.0, w.getframerate()


def _tb_audio(exp: Path, phase: str, tag: str) -> tuple[np.ndarray, int]:
    return _wav(_events(exp, phase).Audio(tag)[0].encoded_audio_string)


def _json_media(exp: Path, phase: str, tag: str) -> Path:
    lines = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    paths = [line["media"][tag] for line in lines if line.get("phase") == phase and tag in line.get("media", {})]
    assert paths, f"{tag} is not in the JSON log's {phase} media"
    return exp / "json" / paths[0]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _ink_columns(strip: np.ndarray) -> np.ndarray:
    return np.flatnonzero((strip.min(axis=-1) < 128).any(axis=0))


# ---------------------------------------------------------------------------------------------------------------------
# 0.2's signatures


# Every keyword of mlfab 0.2.x's `log_*` methods (mlfab/task/mixins/logger.py, the methods a task calls) and its
# default there.
KEYWORDS_02: dict[str, dict[str, Any]] = {
    "log_scalar": {"namespace": None},
    "log_string": {"namespace": None},
    "log_image": {"namespace": None, "keep_resolution": False},
    "log_labeled_image": {"namespace": None, "max_line_length": None, "keep_resolution": False, "centered": True},
    "log_images": {"namespace": None, "keep_resolution": False, "max_images": None, "sep": 0},
    "log_labeled_images": {
        "namespace": None,
        "max_line_length": None,
        "keep_resolution": False,
        "max_images": None,
        "sep": 0,
        "centered": True,
    },
    "log_audio": {
        "namespace": None,
        "sample_rate": 44100,
        "log_spec": True,
        "n_fft_ms": 32.0,
        "hop_length_ms": None,
        "channel_select_mode": "first",
        "keep_resolution": False,
    },
    "log_audios": {
        "namespace": None,
        "sep_ms": 0.0,
        "max_audios": None,
        "sample_rate": 44100,
        "log_spec": True,
        "n_fft_ms": 32.0,
        "hop_length_ms": None,
        "channel_select_mode": "first",
        "spec_sep": 0,
        "keep_resolution": False,
    },
    "log_spectrogram": {
        "namespace": None,
        "sample_rate": 44100,
        "n_fft_ms": 32.0,
        "hop_length_ms": None,
        "channel_select_mode": "first",
        "keep_resolution": False,
    },
    "log_spectrograms": {
        "namespace": None,
        "max_audios": None,
        "sample_rate": 44100,
        "n_fft_ms": 32.0,
        "hop_length_ms": None,
        "channel_select_mode": "first",
        "spec_sep": 0,
        "keep_resolution": False,
    },
    "log_video": {"namespace": None, "fps": None, "length": None},
    "log_videos": {"namespace": None, "max_videos": None, "sep": 0, "fps": None, "length": None},
    "log_histogram": {"namespace": None},
    "log_point_cloud": {"namespace": None, "max_points": 1000, "colors": None},
}


@pytest.mark.unit
@pytest.mark.parametrize("method", sorted(KEYWORDS_02))
def test_every_02_keyword_is_a_keyword_with_02s_default(method: str) -> None:
    params = inspect.signature(getattr(mlfab.Task, method)).parameters
    assert list(params)[:3] == ["self", "key", "value"]
    found = {
        name: params[name].default
        for name in KEYWORDS_02[method]
        if name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert found == KEYWORDS_02[method]
    doc = inspect.getdoc(getattr(mlfab.Task, method)) or ""
    undocumented = [name for name in KEYWORDS_02[method] if name not in ("namespace", "value") and name not in doc]
    assert not undocumented, f"{method}'s docstring does not say what {undocumented} do"


@pytest.mark.unit
def test_a_bad_channel_select_mode_is_refused_at_the_call() -> None:
    task = BoringTask(BoringConfig())
    with pytest.raises(ValueError, match=r"log_audio\('a'\): channel_select_mode must be 'first', 'last' or 'mean'"):
        task.log_audio("a", torch.zeros(100), channel_select_mode="left")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# 0.2's defaults and normalisation


@pytest.mark.integration
def test_a_float_image_is_min_max_normalised_as_in_02(defaults_run: Path) -> None:
    """A [-1, 1] ramp shows from black to white (0.2), not clipped to [0, 1] (black left half)."""
    row = _first_image(defaults_run, "valid", "value/ramp")[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[32] - 128) <= 3
    assert (np.diff(row) > 0).all()  # Every step of the ramp is visible.
    pair = _first_image(defaults_run, "valid", "value/pair")
    assert (pair[:, :8] == 0).all() and (np.abs(pair[:, 8:].astype(int) - 128) <= 1).all()  # -1 and 0, one range.
    png = np.asarray(Image.open(_json_media(defaults_run, "valid", "value/ramp")))
    assert png[0, 0, 0] == 0 and png[0, -1, 0] == 255 and abs(int(png[0, 32, 0]) - 128) <= 3


@pytest.mark.integration
def test_anti_phase_stereo_audio_stays_stereo_and_audible(defaults_run: Path) -> None:
    """Stereo is kept, so a clip whose channels cancel out is not silence, in TensorBoard and in the JSON WAVs."""
    for tag, samples in (("value/anti", T_AUDIO), ("value/anti_batch", 3 * T_AUDIO)):
        tb, rate = _tb_audio(defaults_run, "train", tag)
        wav, wav_rate = soundfile.read(str(_json_media(defaults_run, "train", tag)))
        for clip in (tb, wav):
            assert clip.shape == (samples, 2), tag  # Both channels; a batch back to back (0.2's sep_ms=0).
            assert _rms(clip[:, 0]) > 0.5 and _rms(clip[:, 1]) > 0.5, tag
            assert np.allclose(clip[:, 0], -clip[:, 1], atol=1e-3), tag
        assert rate == wav_rate == 44100  # 0.2's default sample rate.


@pytest.mark.integration
def test_log_audio_adds_its_spectrogram_under_02s_tag(defaults_run: Path) -> None:
    images = read_images(defaults_run / "tensorboard" / "train")
    assert "value/anti_spec" in images and "value/anti_batch_spec" in images


@pytest.mark.integration
def test_spectrograms_show_the_first_channel_by_default(defaults_run: Path) -> None:
    """0.2's channel_select_mode="first": the left channel's 440 Hz, not the right channel's 3 kHz."""
    image = _first_image(defaults_run, "valid", "value/two_tones").astype(float).sum(axis=-1)
    height = image.shape[0]
    row_of = {freq: round((1 - freq / (SR / 2)) * (height - 1)) for freq in (440, 3000)}  # Low frequencies below.
    band = {freq: image[max(0, row - 3) : row + 4].mean() for freq, row in row_of.items()}
    assert band[440] > 3 * band[3000], band


@pytest.mark.integration
def test_max_images_picks_evenly_spaced_images_without_separators(defaults_run: Path) -> None:
    """4 of 10 are images 0, 3, 6 and 9 (0.2's choice, not the first four), tiled with 0.2's sep=0."""
    grid = _first_image(defaults_run, "valid", "value/numbered")
    assert grid.shape[:2] == (16, 16)
    tiles = [int(grid[r * 8 + 4, c * 8 + 4, 0]) for r in range(2) for c in range(2)]
    assert tiles == [0, 60, 120, 180]


@pytest.mark.integration
def test_labeled_image_captions_are_centered_by_default(defaults_run: Path) -> None:
    image = _first_image(defaults_run, "valid", "value/caption")
    columns = _ink_columns(image[64:])
    assert columns.size and abs((columns[0] + columns[-1]) / 2 - 32) <= 3, columns


@pytest.mark.integration
def test_a_grayscale_video_is_shown_gray_with_every_frame(defaults_run: Path) -> None:
    """(T, H, W) floats: 15 gray frames (not resampled), normalised by the last frame's range, [-1, 1], as in 0.2:
    the last frame spans black to white, the first frame's [-3, 3] is clipped to it."""
    frames, durations = _tb_gif(defaults_run, "value/gray")
    assert len(frames) == 15 and set(durations) == {80, 90} and sum(durations) == 1250  # 12 fps: 83.3 ms each.
    for frame in frames:
        assert frame.shape == (8, 8, 3) and (frame == frame[..., :1]).all()  # R = G = B.
    rows = [frame[0, :, 0].astype(int) for frame in frames]
    assert rows[-1][0] == 0 and rows[-1][-1] == 255 and (np.diff(rows[-1]) > 0).all()
    assert rows[0][:3].tolist() == [0, 0, 0] and rows[0][-3:].tolist() == [255, 255, 255]  # Clipped.
    assert abs(rows[7][0] - 64) <= 2 and abs(rows[7][-1] - 191) <= 2  # Half the ramp: [-0.5, 0.5].
    json_frames, _ = _gif_frames(_json_media(defaults_run, "valid", "value/gray").read_bytes())
    assert len(json_frames) == 15 and json_frames[-1][0, 0, 0] == 0 and json_frames[-1][0, -1, 0] == 255


@pytest.mark.integration
def test_videos_are_not_resampled_unless_asked(defaults_run: Path) -> None:
    frames, durations = _tb_gif(defaults_run, "value/rgb")
    assert len(frames) == 30 and set(durations) == {80, 90} and sum(durations) == 2500  # 12 fps


@pytest.mark.integration
def test_point_clouds_keep_02s_1000_points_by_default(defaults_run: Path) -> None:
    assert np.load(_json_media(defaults_run, "valid", "value/cloud")).shape == (1000, 3)


# ---------------------------------------------------------------------------------------------------------------------
# 0.2's keywords


@pytest.mark.integration
def test_every_02_keyword_call_is_written(keywords_run: Path) -> None:
    images = read_images(keywords_run / "tensorboard" / "valid")
    for tag in (
        "image",
        "narrow",
        "left",
        "grid",
        "labeled_grid",
        "audio_spec",
        "audios_spec",
        "spectrogram",
        "spectrograms",
    ):
        assert f"kw/{tag}" in images, tag
    assert "kw/no_spec_spec" not in images  # log_spec=False
    acc = _events(keywords_run, "valid")
    assert {"kw/audio", "kw/audios", "kw/no_spec"} <= set(acc.Tags()["audio"])
    assert {"kw/timed", "kw/by_length", "kw/videos", "kw/videos_timed"} <= set(acc.Tags()["images"])
    assert [e.value for e in acc.Scalars("kw/scalar")][0] == 1.5
    assert "kw/string/text_summary" in acc.Tags()["tensors"] and "kw/histogram" in acc.Tags()["histograms"]


@pytest.mark.integration
def test_image_and_caption_keywords_keep_their_02_meaning(keywords_run: Path) -> None:
    height, width = _first_image(keywords_run, "valid", "kw/image").shape[:2]
    assert abs(width / height - 8) < 0.1 and abs(height * width / 256**2 - 1) < 0.02  # Resized, aspect kept.
    narrow, left = _first_image(keywords_run, "valid", "kw/narrow"), _first_image(keywords_run, "valid", "kw/left")
    assert narrow.shape[1] == left.shape[1] == 64  # keep_resolution=True
    assert narrow.shape[0] > left.shape[0]  # max_line_length=4 wraps "a fairly long caption" into more lines.
    assert _ink_columns(left[64:])[0] <= 4  # centered=False: the text starts at the left edge.
    grid = _first_image(keywords_run, "valid", "kw/grid")
    assert grid.shape[:2] == (2 * 8 + 3, 2 * 8 + 3)  # sep=3
    assert [int(grid[r * 11 + 4, c * 11 + 4, 0]) for r in range(2) for c in range(2)] == [0, 60, 120, 180]
    assert (grid[8:11] == 0).all() and (grid[:, 8:11] == 0).all()
    labeled = _first_image(keywords_run, "valid", "kw/labeled_grid")
    colors, counts = np.unique(labeled.reshape(-1, 3), axis=0, return_counts=True)
    shown = {tuple(int(v) for v in c) for c, n in zip(colors, counts, strict=True) if n >= 32 * 32}
    assert shown - {(0, 0, 0), (255, 255, 255)} == {_color(0), _color(2), _color(5)}  # max_images=3 of 6: 0, 2, 5


@pytest.mark.integration
def test_audio_keywords_keep_their_02_meaning(keywords_run: Path) -> None:
    clip, rate = _tb_audio(keywords_run, "valid", "kw/audio")
    assert rate == SR and clip.shape == (SR // 2, 2)
    spec = _first_image(keywords_run, "valid", "kw/audio_spec")
    # n_fft_ms=32 at 8 kHz: 256 samples, 129 bins; hop_length_ms=8: 64 samples; keep_resolution: one pixel each.
    assert spec.shape[:2] == (129, 1 + (SR // 2) // 64)
    assert spec.max() < 10  # channel_select_mode="last": the silent right channel.

    batch, rate = _tb_audio(keywords_run, "valid", "kw/audios")
    assert rate == SR and batch.shape == (2 * (SR // 2) + 400, 2)  # max_audios=2 clips, sep_ms=50: 400 samples.
    first, gap, last = batch[: SR // 2], batch[SR // 2 : SR // 2 + 400], batch[SR // 2 + 400 :]
    assert not gap.any() and _rms(first) < 0.5 * _rms(last)  # Clips 0 and 2 of 3: a third and all of the level.
    specs = _first_image(keywords_run, "valid", "kw/audios_spec")
    # n_fft_ms=64: 512 samples, 257 bins, hop 128; two of them side by side with spec_sep=4. "mean" of a clip and
    # its negation is silence: black.
    assert specs.shape[:2] == (257, 2 * (1 + (SR // 2) // 128) + 4) and specs.max() < 10

    single = _first_image(keywords_run, "valid", "kw/spectrogram")
    assert single.shape[:2] == (129, 1 + (SR // 2) // 128)  # hop_length_ms=16: 128 samples
    several = _first_image(keywords_run, "valid", "kw/spectrograms")
    assert several.shape[:2] == (129, 2 * (1 + (SR // 2) // 64) + 2)  # max_audios=2, spec_sep=2


@pytest.mark.integration
def test_video_keywords_keep_their_02_meaning(keywords_run: Path) -> None:
    frames, durations = _tb_gif(keywords_run, "kw/timed")
    assert len(frames) == 12 and set(durations) == {80, 90} and sum(durations) == 1000  # fps=24: 1 s, at 12 fps.
    frames, durations = _tb_gif(keywords_run, "kw/by_length")
    assert len(frames) == 20 and set(durations) == {250}  # length=5 s for 20 frames: 4 fps.
    frames, _ = _tb_gif(keywords_run, "kw/videos")
    # 0.2's list of time steps: 5 frames of a batch of 3, max_videos=2 of them side by side with sep=1.
    assert len(frames) == 5 and frames[0].shape == (8, 17, 3)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 64, 128, 191, 255] and (frames[-1][:, 8] == 0).all()
    frames, _ = _tb_gif(keywords_run, "kw/videos_timed")
    assert len(frames) == 12  # fps=24 resamples time (24 frames -> 12), not the batch.
    cloud = np.load(_json_media(keywords_run, "valid", "kw/cloud"))
    assert cloud.shape == (200, 6)  # max_points=100 of each of 2 clouds, (3, N) layout, with colors.


# ---------------------------------------------------------------------------------------------------------------------
# Custom loggers


class Collecting(PlainLogger):
    """The smallest custom logger: it keeps what it is given."""

    def __init__(self) -> None:
        super().__init__(log_interval_seconds=0)
        self.seen: list[Logs] = []

    def write(self, logs: Logs) -> None:
        self.seen.append(logs)


class WithCustomLogger(BoringTask):
    collected: Collecting | None = None

    def set_loggers(self) -> None:
        WithCustomLogger.collected = Collecting()
        self.add_logger(WithCustomLogger.collected)

    def log_train_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
        self.log_image("picture", torch.rand(3, 16, 16))


@pytest.mark.integration
def test_a_custom_logger_subclass_gets_scalars_and_images(tmp_path: Path) -> None:
    WithCustomLogger.launch(BoringConfig(max_steps=3, valid_every_n_steps=None, run_dir=str(tmp_path)), argv=[])
    logger = WithCustomLogger.collected
    assert logger is not None and logger.name == "Collecting"
    train = [logs for logs in logger.seen if logs.phase == "train" and logs.of("image")]
    assert [logs.step for logs in train] == [0, 1, 2]  # log_interval_seconds=0: every step.
    assert all("loss/loss" in logs.scalars and isinstance(logs.scalars["loss/loss"], float) for logs in train)
    picture = train[0].of("image")["value/picture"]
    assert isinstance(picture, np.ndarray) and picture.dtype == np.uint8 and picture.shape == (256, 256, 3)
    assert any(logs.phase == "valid" and "loss/loss" in logs.scalars for logs in logger.seen)


@pytest.mark.unit
def test_the_custom_logger_base_class_says_what_to_implement() -> None:
    doc = inspect.getdoc(PlainLogger) or ""
    assert "write(self, logs)" in doc
    for kind in ("scalar", "string", "image", "audio", "video", "histogram", "point_cloud"):
        assert f'"{kind}"' in doc, kind
    assert PlainLogger.__abstractmethods__ == frozenset({"write"})  # The one method a subclass must implement.
