"""The `log_*` methods of `mlfab.Task`: each call stores a value or a zero-argument callable under
`<namespace>/<key>` in the current phase's buffer (`LogMethods._log`, which the task implements); nothing is
computed unless a logger writes it (see mlfab/logs/buffer.py).

Every keyword of mlfab 0.2's `log_*` methods is accepted with 0.2's meaning and default; where mlfab differs on
purpose, the method's docstring says so and why. Normalisation, as in 0.2:
- float images: the range [min(lowest value, 0), max(highest value, 1)] maps to black..white, for a batch over
  the whole batch (`mlfab.logs.media.float_range`): pixels already in [0, 1] keep their brightness, a [-1, 1]
  image shows its full range instead of being clipped. Integer pixels are read as 0..255, bools as black/white.
- float videos: the same, with the range of the last frame (of every video, for a batch); earlier frames outside
  it are clipped (a denoising video is shown in the range of the sample it ends on).
- audio: a clip (or batch) whose loudest sample exceeds 1 is divided by that peak; quieter audio is unchanged.
  Stereo stays stereo (TensorBoard, W&B and the JSON logger's WAV files all keep both channels).
"""

import functools
from typing import Any, Literal

import numpy as np

from mlfab.logs import media
from mlfab.logs.values import Audio, PointCloud, Video, resolve

ChannelSelectMode = Literal["first", "last", "mean"]


class LogMethods:
    """Mixin of `mlfab.Task` with every `log_*` method.

    Each takes a value or a zero-argument callable returning it (called only on steps a logger writes, at most
    once) and a keyword `namespace` (default "value"): the tag is `<namespace>/<key>`.
    """

    def _log(self, kind: str, key: str, value: Any, namespace: str | None) -> None:
        raise NotImplementedError

    def log_scalar(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        """A number: a Python number or a one-element tensor."""
        self._log("scalar", key, value, namespace)

    def log_string(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        """A text (anything else is written as its `str`)."""
        self._log("string", key, lambda: str(resolve(value)), namespace)

    def log_image(self, key: str, value: Any, *, namespace: str | None = None, keep_resolution: bool = False) -> None:
        """One image: (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4 (alpha dropped), a tensor, an array or a PIL
        image. Floats are normalised as in 0.2 (module docstring: a [-1, 1] image shows its full range).

        Args:
            keep_resolution: Keep the image's own size. By default it is resized to about 256 x 256 pixels keeping
                its aspect ratio (0.2: about 512 x 512; mlfab's size already fills TensorBoard's image card,
                350 x 215, and takes a quarter of the bytes).
        """
        self._log(
            "image", key, lambda: media.make_image(resolve(value), key, keep_resolution=keep_resolution), namespace
        )

    def log_labeled_image(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_line_length: int | None = None,
        keep_resolution: bool = False,
        centered: bool = True,
    ) -> None:
        """`value` is `(image, label)` or a callable returning it; the label is drawn in a white strip under the
        image, wrapped at words to the image's width, in a font sized to be read in TensorBoard's image card.

        Args:
            max_line_length: At most this many characters on a caption line; longer lines are wrapped, at spaces
                where a word fits (0.2 cut them every `max_line_length` characters, mid-word).
            keep_resolution: As in `log_image`.
            centered: Center each caption line under the image (0.2's default); False aligns it to the left.
        """

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

        self._log("image", key, make, namespace)

    def log_images(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        keep_resolution: bool = False,
        max_images: int | None = None,
        sep: int = 0,
    ) -> None:
        """A batch, (B, H, W), (B, C, H, W) or (B, H, W, C) (or a list of images), tiled into one near-square grid.
        Floats are normalised over the whole batch, so brightness compares across images.

        Args:
            keep_resolution: As in `log_image`, for each image.
            max_images: Show this many images, spread evenly over the batch from its first to its last (0.2's
                choice: 4 of 10 are 0, 3, 6 and 9).
            sep: Black pixels between adjacent images.
        """

        def make() -> np.ndarray:
            return media.make_images(
                resolve(value), key, max_images=max_images, sep=sep, keep_resolution=keep_resolution
            )

        self._log("image", key, make, namespace)

    def log_labeled_images(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_line_length: int | None = None,
        keep_resolution: bool = False,
        max_images: int | None = None,
        sep: int = 0,
        centered: bool = True,
    ) -> None:
        """`value` is `(images, labels)` (one label per image) or a callable returning it; each image gets its
        caption as in `log_labeled_image`, every caption strip as tall as the longest needs, and the grid's columns
        and font are chosen so the captions can be read in TensorBoard's image card.

        Args:
            max_line_length, centered: As in `log_labeled_image`.
            keep_resolution, max_images, sep: As in `log_images`; the labels follow their images.
        """

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

        self._log("image", key, make, namespace)

    def log_audio(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        sample_rate: int = 44100,
        log_spec: bool = True,
        n_fft_ms: float = 32.0,
        hop_length_ms: float | None = None,
        channel_select_mode: ChannelSelectMode = "first",
        keep_resolution: bool = False,
    ) -> None:
        """A clip: (T,), (C, T) or (T, C) (C in 1, 2 is recognised on either side; (C, T) may have up to 8
        channels), float or signed integer PCM (int16 is divided by 32768). Stereo is kept as stereo.

        Args:
            sample_rate: Samples per second.
            log_spec: Also log its spectrogram as the image `<key>_spec` (see `log_spectrogram`).
            n_fft_ms, hop_length_ms, channel_select_mode, keep_resolution: For the spectrogram, as in
                `log_spectrogram`.
        """
        media.check_channel_mode(channel_select_mode, f"log_audio({key!r})")
        sample_rate = media.check_sample_rate(sample_rate, f"log_audio({key!r})")
        value = _once(value)
        self._log("audio", key, lambda: Audio(media.normalize_audio(value(), key), sample_rate), namespace)
        if log_spec:
            self.log_spectrogram(
                f"{key}_spec",
                value,
                namespace=namespace,
                sample_rate=sample_rate,
                n_fft_ms=n_fft_ms,
                hop_length_ms=hop_length_ms,
                channel_select_mode=channel_select_mode,
                keep_resolution=keep_resolution,
            )

    def log_audios(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        sep_ms: float = 0.0,
        max_audios: int | None = None,
        sample_rate: int = 44100,
        log_spec: bool = True,
        n_fft_ms: float = 32.0,
        hop_length_ms: float | None = None,
        channel_select_mode: ChannelSelectMode = "first",
        spec_sep: int = 0,
        keep_resolution: bool = False,
    ) -> None:
        """A batch of clips, (B, T), (B, C, T) or (B, T, C) (or a list of clips), played one after another as one
        clip; channels are kept (mono clips are repeated on both channels when others are stereo). Clips louder
        than 1 are scaled by the batch's peak, together.

        Args:
            sep_ms: Milliseconds of silence between clips (round(sep_ms * sample_rate / 1000) samples; 0.2 rounded
                it to a power of two of samples, 100 ms at 44.1 kHz becoming 93 ms).
            max_audios: Play this many clips, spread evenly over the batch (as `max_images`).
            sample_rate: Samples per second.
            log_spec: Also log their spectrograms, tiled, as the image `<key>_spec` (see `log_spectrograms`).
            n_fft_ms, hop_length_ms, channel_select_mode, spec_sep, keep_resolution: For the spectrograms, as in
                `log_spectrograms`.
        """
        media.check_channel_mode(channel_select_mode, f"log_audios({key!r})")
        sample_rate = media.check_sample_rate(sample_rate, f"log_audios({key!r})")
        value = _once(value)

        def make() -> Audio:
            clips = media.peak_normalize(_audio_clips(value, f"log_audios({key!r})", max_audios))
            return Audio(media.join_audio(clips, round(sep_ms * sample_rate / 1000)), sample_rate)

        self._log("audio", key, make, namespace)
        if log_spec:
            self.log_spectrograms(
                f"{key}_spec",
                value,
                namespace=namespace,
                max_audios=max_audios,
                sample_rate=sample_rate,
                n_fft_ms=n_fft_ms,
                hop_length_ms=hop_length_ms,
                channel_select_mode=channel_select_mode,
                spec_sep=spec_sep,
                keep_resolution=keep_resolution,
            )

    def log_spectrogram(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        sample_rate: int = 44100,
        n_fft_ms: float = 32.0,
        hop_length_ms: float | None = None,
        channel_select_mode: ChannelSelectMode = "first",
        keep_resolution: bool = False,
    ) -> None:
        """The log-magnitude spectrogram of a clip (layouts as in `log_audio`) as an image.

        The picture differs from 0.2's on purpose, where 0.2's misleads: low frequencies are at the bottom (0.2 drew
        the zero frequency at the top, upside down from every audio tool), a Hann window is used (0.2 used none,
        whose leakage draws a pure tone as a smear of false partials), and the level is shown in color over the
        80 dB below the loudest bin (0.2 showed the log magnitude in gray down to 1e-6, some 120 dB below a full
        scale tone, so most of the gray scale went to the noise floor).

        Args:
            sample_rate: Samples per second.
            n_fft_ms: FFT window in milliseconds, rounded to a power of two of samples as in 0.2 (32 ms at
                44.1 kHz: 1024 samples).
            hop_length_ms: Hop between windows in milliseconds, rounded the same way; default a quarter window.
            channel_select_mode: Which channel of a stereo clip to show: "first", "last" or "mean".
            keep_resolution: Keep one pixel per frame and frequency bin; by default the picture is resized like an
                image (`log_image`).
        """
        media.check_channel_mode(channel_select_mode, f"log_spectrogram({key!r})")
        sample_rate = media.check_sample_rate(sample_rate, f"log_spectrogram({key!r})")

        def make() -> np.ndarray:
            n_fft, hop = _stft_sizes(sample_rate, n_fft_ms, hop_length_ms)
            picture = media.make_spectrogram(
                resolve(value),
                key,
                sample_rate=sample_rate,
                n_fft=n_fft,
                hop=hop,
                channel_select_mode=channel_select_mode,
            )
            return media.resize_to_area(picture, keep_resolution=keep_resolution)

        self._log("image", key, make, namespace)

    def log_spectrograms(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_audios: int | None = None,
        sample_rate: int = 44100,
        n_fft_ms: float = 32.0,
        hop_length_ms: float | None = None,
        channel_select_mode: ChannelSelectMode = "first",
        spec_sep: int = 0,
        keep_resolution: bool = False,
    ) -> None:
        """The spectrograms of a batch of clips (layouts as in `log_audios`), tiled into one image; one level scale
        for all of them, so loudness compares across clips.

        Args:
            max_audios: Show this many clips, spread evenly over the batch (as `max_images`).
            spec_sep: Black pixels between adjacent spectrograms.
            sample_rate, n_fft_ms, hop_length_ms, channel_select_mode, keep_resolution: As in `log_spectrogram`.
        """
        media.check_channel_mode(channel_select_mode, f"log_spectrograms({key!r})")
        sample_rate = media.check_sample_rate(sample_rate, f"log_spectrograms({key!r})")

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
            return media.tile_images(
                [media.resize_to_area(p, keep_resolution=keep_resolution) for p in pictures], spec_sep
            )

        self._log("image", key, make, namespace)

    def log_video(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        fps: int | None = None,
        length: float | None = None,
        target_fps: int | None = 12,
    ) -> None:
        """Frames (T, H, W) (grayscale, shown gray), (T, C, H, W) or (T, H, W, C) with C in 1, 3, 4. Floats are
        normalised by the last frame's range (module docstring).

        Args:
            fps: The rate the frames were recorded at. Without `fps` and `length` (0.2's default) every frame is
                shown, at `target_fps`.
            length: Without `fps`: the clip's duration in seconds (fps = frames / length).
            target_fps: mlfab's addition: the rate videos are shown at (12, 0.2's fixed rate). A clip whose `fps`
                is higher is resampled down to it by nearest timestamp, keeping its duration, as 0.2 did; a slower
                one is shown at its own rate (0.2 repeated its frames up to 12 fps: the same playback, more
                frames). None never drops frames.
        """

        def make() -> Video:
            frames = media.to_numpy(resolve(value))
            src, shown = video_rates(len(frames) if frames.ndim else 0, fps, length, target_fps, f"log_video({key!r})")
            return Video(media.make_video(frames, key, fps=src, target_fps=shown), shown)

        self._log("video", key, make, namespace)

    def log_videos(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_videos: int | None = None,
        sep: int = 0,
        fps: int | None = None,
        length: float | None = None,
        target_fps: int | None = 12,
    ) -> None:
        """A batch of videos played side by side in a near-square grid: (B, T, H, W) (grayscale), (B, T, C, H, W)
        or (B, T, H, W, C), or, as in 0.2, a list of the frames in time order, each a batch (B, C, H, W),
        (B, H, W, C) or (B, H, W) (what a sampling loop appends step by step). Floats are normalised by the range
        of every video's last frame.

        Args:
            max_videos: Show the first this many videos (as 0.2 did).
            sep: Black pixels between adjacent videos.
            fps, length, target_fps: As in `log_video` (0.2 resampled the batch axis instead of time here when
                given a tensor; mlfab resamples time).
        """

        def make() -> Video:
            where = f"log_videos({key!r})"
            batch = media.video_batch(resolve(value), where)
            src, shown = video_rates(batch.shape[1], fps, length, target_fps, where)
            return Video(
                media.make_videos(batch, key, fps=src, target_fps=shown, max_videos=max_videos, sep=sep), shown
            )

        self._log("video", key, make, namespace)

    def log_histogram(self, key: str, value: Any, *, namespace: str | None = None) -> None:
        """The distribution of a tensor's values (e.g. weights or activations), any shape; NaN and inf are left out
        of the bins, with a warning (with none left, TensorBoard and W&B write nothing for it; the JSON logger keeps
        the raw values); an empty or complex one is skipped as a value that cannot be written."""

        def make() -> np.ndarray:
            values, where = media.to_numpy(resolve(value)), f"log_histogram({key!r})"
            if np.iscomplexobj(values):  # numpy would drop the imaginary part with only a ComplexWarning.
                raise ValueError(f"{where}: cannot bin complex values; log their .abs(), .angle(), .real or .imag")
            values = values.astype(np.float64).reshape(-1)
            if not values.size:  # Skipped, and said, as any value that cannot be written (an empty image too).
                raise ValueError(f"{where}: no values to bin")
            binned = "left out of the bins" if np.isfinite(values).any() else "no histogram for TensorBoard and W&B"
            media.note_nonfinite(values, where, binned)
            return values

        self._log("histogram", key, make, namespace)

    def log_point_cloud(
        self,
        key: str,
        value: Any,
        *,
        namespace: str | None = None,
        max_points: int = 1000,
        colors: Any = None,
    ) -> None:
        """Points (N, 3), or B clouds (B, ..., 3), or with the coordinates first, (3, N) / (B, 3, N).

        Args:
            max_points: Keep at most this many points of each cloud, sampled at random (reproducibly).
            colors: A color per point, the points' shape; floats in [0, 1] or [0, 255], or uint8. Without colors,
                each cloud of a batch gets its own color.
        """

        def make() -> PointCloud:
            points, cloud_colors = media.subsample_points(
                resolve(value), key, max_points=max_points, colors=resolve(colors)
            )
            return PointCloud(points, cloud_colors)

        self._log("point_cloud", key, make, namespace)


DEFAULT_VIDEO_FPS = 12  # mlfab 0.2's TARGET_FPS: the rate videos are shown at.


def _audio_clips(value: Any, where: str, max_audios: int | None) -> list[np.ndarray]:
    """The clips of a batch as (C, T), `max_audios` of them spread evenly over it (0.2's choice)."""
    clips = media.audio_batch(resolve(value), where)
    if not clips:
        raise ValueError(f"{where}: the batch is empty")
    if max_audios is not None and max_audios < 1:
        raise ValueError(f"{where}: max_audios must be at least 1, got {max_audios}")
    return [clips[i] for i in media.evenly_spaced(len(clips), max_audios)]


def _stft_sizes(sample_rate: int, n_fft_ms: float, hop_length_ms: float | None) -> tuple[int, int | None]:
    n_fft = media.stft_frames(n_fft_ms, sample_rate)
    return n_fft, None if hop_length_ms is None else media.stft_frames(hop_length_ms, sample_rate)


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


def _once(value: Any) -> Any:
    """A callable returning `value` (called, if it is a callable) and remembering the result: the audio and its
    spectrogram resolve a user's callable once."""
    return functools.cache(lambda: resolve(value))
