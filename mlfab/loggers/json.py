"""`mlfab.JsonLogger(exp_dir)`: `<exp_dir>/json/log.jsonl`, one JSON object per write, media as files beside it.

Why: a record any script can read without TensorBoard or W&B (`json.loads` per line, `pandas.read_json(path,
lines=True)`, `jq`), that loses nothing on a crash (each line is flushed as it is written) and keeps every kind
mlfab logs. Training values are written every 2 s by default, not every step (see `JsonLogger`). A write is
one line:

    {"phase": "train", "step": 10, "elapsed_time_s": 1.5, "num_samples": 80,
     "scalars": {"loss/loss": 0.25}, "strings": {"text/sample": "..."},
     "histograms": {"hist/w": {"min": ..., "max": ..., "mean": ..., "std": ..., "count": ...}},
     "media": {"image/x": "media/train/image__x/10.png", "hist/w": "media/train/hist__w/10.npy"}}

Media paths are relative to `<exp_dir>/json`: `media/<phase>/<tag, "/" written as "__">/<step>.<ext>` (other
characters than letters, digits, "_", "." and "-" written as "_", then a hash of the tag: `value__a_b_1c2d3e`), with
images as .png, audio as .wav (16-bit PCM), video as .gif (every frame, looping, frame time from fps),
histograms as .npy (the raw values; the line has their summary) and point clouds as .npy ((N, 6) xyz + rgb, or
(N, 3) without colours). Non-finite scalars are written as NaN / Infinity, which Python and pandas read.

Lightning's `log_hyperparams` adds a line {"phase": "hparams", "hparams": {...}} (for an mlfab task, its config);
`write_config` writes nothing, since `<exp_dir>/config.yaml` and that line already hold the config.
What Lightning hands `log_metrics` (a plain LightningModule's `self.log` values in a Trainer with this logger,
callbacks such as LearningRateMonitor) is a line of its own at each call (Lightning spaces them out itself,
`log_every_n_steps`), at Lightning's step, with phase "metrics" and null time and samples, which Lightning does not
give (the metric's name says its phase):

    {"phase": "metrics", "step": 4, "elapsed_time_s": null, "num_samples": null, "scalars": {"val_loss": 0.5}, ...}

A run that resumes from a checkpoint adds {"phase": "resume", "steps": {"train": 6, "valid": 7, "metrics": 6}}: the
lines before it of a phase at that step or later were written after the checkpoint by a launch that then stopped (a
crash), and the resumed run writes those steps again; drop them to read each step once. "metrics" lines go by the
training step: Lightning's step for them is the number of the training step under way, as a training line's.
"""

import argparse
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from typing_extensions import override

from mlfab.loggers.base import PlainLogger
from mlfab.logs.values import Audio, Logs, finite, free_tag
from mlfab.state import LogPhase


def _safe_name(tag: str) -> str:
    """A directory name for `tag`: "/" becomes "__", other characters than letters, digits, "_", "." and "-"
    become "_". Where that is not undone by reading "__" as "/" ("a b" and "a_b" would both be "a_b"), 6 hex
    digits of the tag's SHA-1 are appended, so two tags never share a directory."""
    name = re.sub(r"[^\w.-]+", "_", tag.replace("/", "__"))
    if name.replace("__", "/") == tag:
        return name
    return f"{name}_{hashlib.sha1(tag.encode()).hexdigest()[:6]}"


def _save_audio(path: Path, audio: Audio) -> None:
    import soundfile

    soundfile.write(str(path), audio.samples, int(audio.sample_rate), subtype="PCM_16")


_MEDIA: dict[str, tuple[str, Callable[[Path, Any], object]]] = {  # kind: (file extension, writer)
    "image": ("png", lambda path, image: Image.fromarray(image).save(path)),
    "audio": ("wav", _save_audio),
    "video": ("gif", lambda path, video: path.write_bytes(video.gif)),
    "histogram": ("npy", lambda path, values: np.save(path, np.asarray(values).ravel())),
    "point_cloud": ("npy", lambda path, cloud: np.save(path, cloud.xyzrgb())),
}


def histogram_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """min / max / mean / std over the finite values (None when there are none); `count` is every value, NaN and
    inf included."""
    kept = finite(values)
    summary = {stat: float(getattr(kept, stat)()) if kept.size else None for stat in ("min", "max", "mean", "std")}
    return {**summary, "count": int(np.size(values))}


def _plain(value: Any) -> Any:
    """json.dumps fallback for hyperparameters: numbers and arrays as numbers, anything else as its str."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # Numpy scalars and scalar tensors.
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return str(value)


def _unused(root: Path, folder: Path, step: int, ext: str) -> Path:
    """`folder/<step>.<ext>` (relative to `root`, its folder made), or `<step>-2.<ext>`, ... where an earlier write
    has that name (an evaluation of the run's checkpoint at the step its training validated at, a step written
    again after a resume): each line keeps pointing at its own file."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    relative, n = folder / f"{step}.{ext}", 2
    while (root / relative).exists():
        relative, n = folder / f"{step}-{n}.{ext}", n + 1
    return relative


class JsonLogger(PlainLogger):
    """`<exp_dir>/json/log.jsonl` and its media (see the module docstring for what a line holds).

    Training values are written at most every `log_interval_seconds` (default 2 s, as the TensorBoard and W&B
    loggers); the first training write and every validation and test are always written. Every write makes mlfab
    evaluate each lazy value logged for that step (`self.log_scalar("x", lambda: ...)`), so writing every step
    evaluates them every step: `benchmarks/json_logging.py` measured 1.2x to 1.3x the time per step of the default
    with one lazy scalar logged each step (0.4 to 0.6 ms more a step, in two runs) and 4.1x with a lazy 64x64
    image as well (9.3 against 2.2 ms; a tiny task on a shared 2-core CPU VM). Every step is still there when wanted
    (a complete record of a short run): `JsonLogger(exp_dir, log_interval_seconds=0)`.
    """

    logger_name = "json"

    def __init__(
        self,
        exp_dir: str | Path,
        log_interval_seconds: float | dict[LogPhase, float] = 2.0,
        file_name: str = "log.jsonl",
    ) -> None:
        super().__init__(log_interval_seconds)
        self._exp_dir = Path(exp_dir)
        self._dir = self._exp_dir / "json"
        self._file_name = file_name
        self._file: IO[str] | None = None

    @property
    @override
    def save_dir(self) -> str:
        return str(self._exp_dir)

    @property
    @override
    def log_dir(self) -> str:
        """`<exp_dir>/json`: the JSON-lines file and its media."""
        return str(self._dir)

    @property
    def path(self) -> Path:
        """The JSON-lines file."""
        return self._dir / self._file_name

    def _write_line(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()  # A crash loses nothing already written.

    @rank_zero_only
    def write(self, logs: Logs) -> None:
        media: dict[str, str] = {}
        for kind, (ext, save) in _MEDIA.items():
            for tag, value in logs.of(kind).items():
                name = free_tag(tag, kind, media)
                relative = _unused(self._dir, Path("media") / logs.phase / _safe_name(name), logs.step, ext)
                save(self._dir / relative, value)
                media[name] = relative.as_posix()
        self._write_line(
            {
                "phase": logs.phase,
                "step": logs.step,
                "elapsed_time_s": logs.elapsed_time_s,
                "num_samples": logs.num_samples,
                "scalars": {tag: float(v) for tag, v in logs.scalars.items()},
                "strings": {tag: str(v) for tag, v in logs.of("string").items()},
                "histograms": {tag: histogram_summary(v) for tag, v in logs.of("histogram").items()},
                "media": media,
            }
        )

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = vars(params) if isinstance(params, argparse.Namespace) else params
        self._write_line({"phase": "hparams", "hparams": dict(params)})

    @override
    @rank_zero_only
    def resumed(self, steps: dict[LogPhase, int]) -> None:
        metrics = {"metrics": steps["train"]} if "train" in steps else {}  # Superseded as the training lines were
        self._write_line({"phase": "resume", "steps": {**steps, **metrics}})  # when they were written as "train".

    def write_run_info(self, info: dict[str, str]) -> None:
        """One line with phase "run": the config and the run's origin (commit, diff, task source)."""
        self._write_line({"phase": "run", **info})

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # An open file cannot be pickled (DDP spawn); it is reopened for appending.
        return state
