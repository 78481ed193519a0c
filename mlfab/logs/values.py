"""The values mlfab logs, as loggers receive them: one `Logs` per write, grouped by kind.

Resolved value of each kind:
  scalar: float          string: str                image: uint8 HWC RGB np.ndarray
  audio: Audio           video: Video               histogram: float np.ndarray (the raw values, flattened)
  point_cloud: PointCloud
"""

import functools
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlfab.logs.media import gif_bytes, wav_bytes
from mlfab.state import WritePhase

Kind = str  # scalar, string, image, audio, video, histogram or point_cloud.


@dataclass
class Audio:
    """float32 samples in [-1, 1], shape (T,) for mono or (T, C) for C channels (stereo stays stereo; a writer
    that can only take mono mixes it down itself), at `sample_rate` samples per second."""

    samples: np.ndarray
    sample_rate: int

    @functools.cached_property
    def wav(self) -> bytes:
        """The samples as a 16-bit PCM WAV file, every channel kept."""
        return wav_bytes(self.samples, self.sample_rate)


@dataclass
class Video:
    """uint8 frames, shape (T, H, W, 3) (grayscale videos have R = G = B), to be played at `fps` frames per second
    (fractional when a video was logged with `length`)."""

    frames: np.ndarray
    fps: float

    @functools.cached_property
    def gif(self) -> bytes:
        """The frames as an animated GIF, encoded once however many loggers write it."""
        return gif_bytes(self.frames, self.fps)


@dataclass
class PointCloud:
    """float32 points (N, 3) and optional uint8 colors (N, 3)."""

    points: np.ndarray
    colors: np.ndarray | None = None

    def xyzrgb(self) -> np.ndarray:
        """One float32 array for writers that take a single one: (N, 6) xyz + rgb, or (N, 3) without colors."""
        points = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)
        if self.colors is None:
            return points
        return np.concatenate([points, np.asarray(self.colors, dtype=np.float32).reshape(-1, 3)], axis=1)


def finite(values: np.ndarray) -> np.ndarray:
    """A histogram's values without NaN and inf, which histogram writers cannot bin (possibly empty)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


@dataclass
class Logs:
    """Resolved values for one write, grouped by kind; tags are `<namespace>/<key>`.

    `phase`: "train", "valid", "test" or "predict", or "metrics": scalars Lightning handed the logger's
    `log_metrics` (a plain LightningModule's `self.log`, LearningRateMonitor), whose phase Lightning does not say
    (their names do: `val_loss`). `step`: the optimizer steps done (training: the step the values were logged at;
    validation: the steps the model had; "metrics": Lightning's step). `max_steps`: the run's limit, if any.
    `elapsed_time_s`: training time so far. `num_samples`: samples seen so far. Both are None where unknown (every
    "metrics" write). `values`: {kind: {tag: value}}, kinds as in the module docstring (`of(kind)` is one kind, empty
    when nothing of it was logged; `scalars` is `of("scalar")`).
    """

    phase: WritePhase
    step: int
    max_steps: int | None
    elapsed_time_s: float | None
    num_samples: int | None
    values: dict[Kind, dict[str, Any]] = field(default_factory=dict)

    def of(self, kind: Kind) -> dict[str, Any]:
        return self.values.get(kind, {})

    @property
    def scalars(self) -> dict[str, float]:
        return self.of("scalar")


def resolve(value: Any) -> Any:
    return value() if callable(value) else value


def free_tag(tag: str, kind: str, taken: Collection[str]) -> str:
    """`tag`, or `<tag>/<kind>` where a value of another kind already has that name in the same write (a key
    logged as a scalar and as a histogram in one step): writers that keep all kinds under one name would
    otherwise keep only one of them."""
    if tag not in taken:
        return tag
    name, n = f"{tag}/{kind}", 2
    while name in taken:  # The user also logged `<tag>/<kind>` itself.
        name, n = f"{tag}/{kind}{n}", n + 1
    return name
