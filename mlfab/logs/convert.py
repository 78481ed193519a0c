"""Lazy builders behind `Task.log_*`: each returns a zero-argument callable that makes the logged value.

Nothing here runs when a `log_*` call is made; the callables run only when a logger writes, and a user
callable shared by two entries (audio and its spectrogram) is resolved once through `once`. The keywords and
their defaults are documented on the `log_*` methods (mlfab/logs/api.py); here every option is explicit.
"""

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from mlfab.logs import media
from mlfab.logs.values import Audio, PointCloud, Video, resolve

Maker = Callable[[], Any]
DEFAULT_VIDEO_FPS = 12  # mlfab 0.2's TARGET_FPS: the rate videos are shown at.


def once(value: Any) -> Maker:
    """A callable returning `value` (called, if it is a callable) and remembering the result."""
    return functools.cache(lambda: resolve(value))


def image(value: Any, key: str, *, keep_resolution: bool) -> Maker:
    return lambda: media.make_image(resolve(value), key, keep_resolution=keep_resolution)


def labeled_image(value: Any, key: str, *, keep_resolution: bool, max_line_length: int | None, centered: bool) -> Maker:
    def make() -> np.ndarray:
        img, label = resolve(value)
        return media.make_image(
            img,
            key,
            label=str(label),
            keep_resolution=keep_resolution,
            max_line_chars=max_line_length,
            centered=centered,
        )

    return make


def images(value: Any, key: str, *, max_images: int | None, sep: int, keep_resolution: bool) -> Maker:
    return lambda: media.make_images(
        resolve(value), key, max_images=max_images, sep=sep, keep_resolution=keep_resolution
    )


def labeled_images(
    value: Any,
    key: str,
    *,
    max_images: int | None,
    sep: int,
    keep_resolution: bool,
    max_line_length: int | None,
    centered: bool,
) -> Maker:
    def make() -> np.ndarray:
        imgs, labels = resolve(value)
        return media.make_images(
            imgs,
            key,
            labels=[str(x) for x in labels],
            max_images=max_images,
            sep=sep,
            keep_resolution=keep_resolution,
            max_line_chars=max_line_length,
            centered=centered,
        )

    return make


def _audio_clips(value: Any, where: str, max_audios: int | None) -> list[np.ndarray]:
    """The clips of a batch as (C, T), `max_audios` of them spread evenly over it (0.2's choice)."""
    clips = media.audio_batch(resolve(value), where)
    if not clips:
        raise ValueError(f"{where}: the batch is empty")
    if max_audios is not None and max_audios < 1:
        raise ValueError(f"{where}: max_audios must be at least 1, got {max_audios}")
    return [clips[i] for i in media.evenly_spaced(len(clips), max_audios)]


def audio(value: Any, key: str, *, sample_rate: int) -> Maker:
    return lambda: Audio(media.normalize_audio(resolve(value), key), sample_rate)


def audios(value: Any, key: str, *, sample_rate: int, max_audios: int | None, sep_ms: float) -> Maker:
    """Clips of a batch played one after another, `sep_ms` milliseconds of silence between them, channels kept."""

    def make() -> Audio:
        clips = media.peak_normalize(_audio_clips(value, f"log_audios({key!r})", max_audios))
        sep_frames = round(sep_ms * sample_rate / 1000)
        return Audio(media.join_audio(clips, sep_frames), sample_rate)

    return make


def _stft_sizes(sample_rate: int, n_fft_ms: float, hop_length_ms: float | None) -> tuple[int, int | None]:
    n_fft = media.stft_frames(n_fft_ms, sample_rate)
    return n_fft, None if hop_length_ms is None else media.stft_frames(hop_length_ms, sample_rate)


def spectrogram(
    value: Any,
    key: str,
    *,
    sample_rate: int,
    n_fft_ms: float,
    hop_length_ms: float | None,
    channel_select_mode: str,
    keep_resolution: bool,
) -> Maker:
    def make() -> np.ndarray:
        n_fft, hop = _stft_sizes(sample_rate, n_fft_ms, hop_length_ms)
        picture = media.make_spectrogram(
            resolve(value), key, sample_rate=sample_rate, n_fft=n_fft, hop=hop, channel_select_mode=channel_select_mode
        )
        return media.resize_to_area(picture, keep_resolution=keep_resolution)

    return make


def spectrograms(
    value: Any,
    key: str,
    *,
    sample_rate: int,
    max_audios: int | None,
    n_fft_ms: float,
    hop_length_ms: float | None,
    channel_select_mode: str,
    spec_sep: int,
    keep_resolution: bool,
) -> Maker:
    def make() -> np.ndarray:
        where = f"log_spectrograms({key!r})"
        clips = _audio_clips(value, where, max_audios)
        n_fft, hop = _stft_sizes(sample_rate, n_fft_ms, hop_length_ms)
        pictures = media.make_spectrograms(
            clips,
            key,
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop=hop,
            channel_select_mode=channel_select_mode,
            where=where,
        )
        return media.tile_images([media.resize_to_area(p, keep_resolution=keep_resolution) for p in pictures], spec_sep)

    return make


def video_rates(
    num_frames: int, fps: float | None, length: float | None, target_fps: float | None, where: str
) -> tuple[float, float]:
    """(the rate the frames were recorded at, the rate they are shown at) for `log_video(s)`.

    Without `fps` or `length` the frames have no known rate: every one is shown, at `target_fps` (12 by default,
    0.2's rate). `fps`, or else `length` (the clip's duration in seconds: fps = frames / length), gives it: a
    clip faster than `target_fps` is resampled down to it by nearest timestamp, a slower one is shown at its own
    rate. `target_fps=None` never resamples.
    """
    if fps is None and length is not None:
        if length <= 0 or num_frames < 1:
            raise ValueError(f"{where}: need a positive length and at least one frame, got {num_frames} in {length} s")
        fps = num_frames / length
    if fps is None:
        shown = float(DEFAULT_VIDEO_FPS if target_fps is None else target_fps)
        return shown, shown
    if fps <= 0:
        raise ValueError(f"{where}: fps must be positive, got {fps}")
    return float(fps), float(fps) if target_fps is None or fps <= target_fps else float(target_fps)


def video(value: Any, key: str, *, fps: float | None, length: float | None, target_fps: float | None) -> Maker:
    def make() -> Video:
        frames = media.to_numpy(resolve(value))
        src, shown = video_rates(len(frames) if frames.ndim else 0, fps, length, target_fps, f"log_video({key!r})")
        return Video(media.make_video(frames, key, fps=src, target_fps=shown), shown)

    return make


def videos(
    value: Any,
    key: str,
    *,
    fps: float | None,
    length: float | None,
    target_fps: float | None,
    max_videos: int | None,
    sep: int,
) -> Maker:
    """A batch of videos played side by side in a near-square grid, frame by frame."""

    def make() -> Video:
        where = f"log_videos({key!r})"
        batch = media.video_batch(resolve(value), where)
        src, shown = video_rates(batch.shape[1], fps, length, target_fps, where)
        return Video(media.make_videos(batch, key, fps=src, target_fps=shown, max_videos=max_videos, sep=sep), shown)

    return make


def histogram(value: Any) -> Maker:
    return lambda: media.to_numpy(resolve(value)).astype(np.float64).reshape(-1)


def point_cloud(value: Any, key: str, *, max_points: int, colors: Any) -> Maker:
    return lambda: PointCloud(
        *media.subsample_points(resolve(value), key, max_points=max_points, colors=resolve(colors))
    )
