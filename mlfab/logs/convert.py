"""Lazy builders behind `Task.log_*`: each returns a zero-argument callable that makes the logged value.

Nothing here runs when a `log_*` call is made; the callables run only when a logger writes, and a user
callable shared by two entries (audio and its spectrogram) is resolved once through `once`.
"""

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from mlfab.logs import media
from mlfab.logs.values import Audio, PointCloud, Video, resolve

Maker = Callable[[], Any]


def once(value: Any) -> Maker:
    """A callable returning `value` (called, if it is a callable) and remembering the result."""
    return functools.cache(lambda: resolve(value))


def image(value: Any, key: str, keep_resolution: bool) -> Maker:
    return lambda: media.make_image(resolve(value), key, keep_resolution=keep_resolution)


def labeled_image(value: Any, key: str, keep_resolution: bool) -> Maker:
    def make() -> np.ndarray:
        img, label = resolve(value)
        return media.make_image(img, key, label=str(label), keep_resolution=keep_resolution)

    return make


def images(value: Any, key: str, max_images: int | None, sep: int, keep_resolution: bool) -> Maker:
    return lambda: media.make_images(
        resolve(value), key, max_images=max_images, sep=sep, keep_resolution=keep_resolution
    )


def labeled_images(value: Any, key: str, max_images: int | None, sep: int, keep_resolution: bool) -> Maker:
    def make() -> np.ndarray:
        imgs, labels = resolve(value)
        return media.make_images(
            imgs, key, labels=[str(x) for x in labels], max_images=max_images, sep=sep, keep_resolution=keep_resolution
        )

    return make


def _clips(value: Any, where: str, max_clips: int | None) -> list[np.ndarray]:
    """The items of a batch (a tensor or array with the batch first, or a list), at most `max_clips`."""
    batch = resolve(value)
    clips = list(batch) if isinstance(batch, list | tuple) else list(media.to_numpy(batch))
    if not clips:
        raise ValueError(f"{where}: the batch is empty")
    return clips[:max_clips] if max_clips is not None else clips


def audio(value: Any, key: str, sample_rate: int) -> Maker:
    return lambda: Audio(media.normalize_audio(resolve(value), key), sample_rate)


def audios(value: Any, key: str, sample_rate: int, max_audios: int | None, gap_s: float = 0.1) -> Maker:
    """Clips of a batch played one after another, with `gap_s` seconds of silence between them."""

    def make() -> Audio:
        clips = [media.normalize_audio(c, key) for c in _clips(value, f"log_audios({key!r})", max_audios)]
        mono = [c if c.ndim == 1 else c.mean(axis=1) for c in clips]
        gap = np.zeros(int(gap_s * sample_rate), dtype=np.float32)
        joined = [part for clip in mono for part in (clip, gap)][:-1]
        return Audio(np.concatenate(joined).astype(np.float32), sample_rate)

    return make


def spectrogram(value: Any, key: str, sample_rate: int) -> Maker:
    return lambda: media.make_spectrogram(resolve(value), key, sample_rate=sample_rate)


def spectrograms(value: Any, key: str, sample_rate: int, max_images: int | None, sep: int) -> Maker:
    def make() -> np.ndarray:
        clips = _clips(value, f"log_spectrograms({key!r})", max_images)
        pictures = [media.make_spectrogram(c, key, sample_rate=sample_rate) for c in clips]
        return media.tile_images(pictures, sep=sep)

    return make


def _out_fps(fps: int, target_fps: int | None) -> int:
    return target_fps if target_fps is not None and target_fps < fps else fps


def video(value: Any, key: str, fps: int, target_fps: int | None) -> Maker:
    out = _out_fps(fps, target_fps)
    return lambda: Video(media.make_video(resolve(value), key, fps=fps, target_fps=out), out)


def videos(value: Any, key: str, fps: int, target_fps: int | None, max_videos: int | None, sep: int) -> Maker:
    """A batch of videos (B, T, ...) played side by side in a near-square grid, frame by frame."""
    out = _out_fps(fps, target_fps)

    def make() -> Video:
        clips = _clips(value, f"log_videos({key!r})", max_videos)
        made = [media.make_video(c, key, fps=fps, target_fps=out) for c in clips]
        length = max(len(m) for m in made)
        # Shorter videos hold their last frame.
        frames = [media.tile_images([m[min(t, len(m) - 1)] for m in made], sep=sep) for t in range(length)]
        return Video(np.stack(frames), out)

    return make


def histogram(value: Any) -> Maker:
    return lambda: media.to_numpy(resolve(value)).astype(np.float64).reshape(-1)


def point_cloud(value: Any, key: str, max_points: int, colors: Any) -> Maker:
    def make() -> PointCloud:
        points, cols = media.subsample_points(resolve(value), key, max_points=max_points, colors=resolve(colors))
        return PointCloud(points, cols)

    return make
