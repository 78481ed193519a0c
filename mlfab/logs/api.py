"""The `log_*` methods of `mlfab.Task`: each call stores a value or a zero-argument callable under
`<namespace>/<key>` in the current phase's buffer (`LogMethods._log`, which the task implements); nothing is
computed unless a logger writes it (see mlfab/logs/buffer.py)."""

from typing import Any

from mlfab.logs import convert as lv
from mlfab.logs.values import resolve


class LogMethods:
    """Mixin of `mlfab.Task` with every `log_*` method."""

    def _log(self, kind: str, key: str, value: Any, namespace: str | None) -> None:
        raise NotImplementedError

    def log_scalar(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        self._log("scalar", key, value, namespace)

    def log_string(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        self._log("string", key, lambda: str(resolve(value)), namespace)

    def log_image(self, key: str, value: Any, *, namespace: str | None = None, keep_resolution: bool = False) -> None:
        """One image, (H, W), (C, H, W) or (H, W, C); floats are read as [0, 1]."""
        self._log("image", key, lv.image(value, key, keep_resolution), namespace)

    def log_labeled_image(
        self, key: str, value: Any, *, namespace: str | None = None, keep_resolution: bool = False
    ) -> None:
        """`value` is `(image, label)` or a callable returning it; the label is drawn under the image."""
        self._log("image", key, lv.labeled_image(value, key, keep_resolution), namespace)

    def log_images(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_images: int | None = None,
        sep: int = 2,
        keep_resolution: bool = False,
    ) -> None:
        """A batch, (B, H, W), (B, C, H, W) or (B, H, W, C), tiled into one near-square grid."""
        self._log("image", key, lv.images(value, key, max_images, sep, keep_resolution), namespace)

    def log_labeled_images(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_images: int | None = None,
        sep: int = 2,
        keep_resolution: bool = False,
    ) -> None:
        """`value` is `(images, labels)` or a callable returning it; each image gets its caption."""
        self._log("image", key, lv.labeled_images(value, key, max_images, sep, keep_resolution), namespace)

    def log_audio(
        self,
        key: str,
        value: Any,
        *,
        sample_rate: int = 16000,
        namespace: str | None = None,
        log_spectrogram: bool = True,
    ) -> None:
        """A waveform, (T,) or (C, T) in [-1, 1]; also logged as a spectrogram image `<key>_spectrogram`."""
        value = lv.once(value)
        self._log("audio", key, lv.audio(value, key, sample_rate), namespace)
        if log_spectrogram:
            self.log_spectrogram(f"{key}_spectrogram", value, sample_rate=sample_rate, namespace=namespace)

    def log_audios(
        self,
        key: str,
        value: Any,
        *,
        sample_rate: int = 16000,
        namespace: str | None = None,
        max_audios: int | None = None,
        log_spectrogram: bool = True,
    ) -> None:
        """A batch of waveforms, played one after another; also their spectrograms, tiled."""
        value = lv.once(value)
        self._log("audio", key, lv.audios(value, key, sample_rate, max_audios), namespace)
        if log_spectrogram:
            self.log_spectrograms(
                f"{key}_spectrogram", value, sample_rate=sample_rate, namespace=namespace, max_images=max_audios
            )

    def log_spectrogram(self, key: str, value: Any, *, sample_rate: int = 16000, namespace: str | None = None) -> None:
        """The log-magnitude spectrogram of a waveform, as an image (low frequencies at the bottom)."""
        self._log("image", key, lv.spectrogram(value, key, sample_rate), namespace)

    def log_spectrograms(
        self,
        key: str,
        value: Any,
        *,
        sample_rate: int = 16000,
        namespace: str | None = None,
        max_images: int | None = None,
        sep: int = 2,
    ) -> None:
        self._log("image", key, lv.spectrograms(value, key, sample_rate, max_images, sep), namespace)

    def log_video(
        self, key: str, value: Any, *, fps: int = 30, target_fps: int | None = 10, namespace: str | None = None
    ) -> None:
        """Frames (T, C, H, W) or (T, H, W, C) at `fps`, resampled to at most `target_fps`."""
        self._log("video", key, lv.video(value, key, fps, target_fps), namespace)

    def log_videos(
        self,
        key: str,
        value: Any,
        *,
        fps: int = 30,
        target_fps: int | None = 10,
        namespace: str | None = None,
        max_videos: int | None = None,
        sep: int = 2,
    ) -> None:
        """A batch of videos (B, T, ...) shown side by side in a grid."""
        self._log("video", key, lv.videos(value, key, fps, target_fps, max_videos, sep), namespace)

    def log_histogram(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        """The distribution of a tensor's values (e.g. weights or activations)."""
        self._log("histogram", key, lv.histogram(value), namespace)

    def log_point_cloud(
        self, key: str, value: Any, *, colors: Any = None, max_points: int = 10_000, namespace: str | None = None
    ) -> None:
        """Points (N, 3) or (B, N, 3) with optional colors, randomly subsampled to `max_points`."""
        self._log("point_cloud", key, lv.point_cloud(value, key, max_points, colors), namespace)
