"""`mlfab.WandbLogger(exp_dir)`: a Weights & Biases run whose files live under `<exp_dir>/wandb`.

Why it is built this way:
- Offline unless credentials are configured: a machine without a W&B key (CI, a fresh cluster node) must never
  stop at a login prompt or wait on W&B's servers. The run is written to disk; `wandb sync <run dir>` uploads it.
- An offline run makes no network call at all. `mode="offline"` alone does not do that (wandb 0.31): the SDK's
  process-wide telemetry follows wandb's global settings, not the run's mode, so it still resolved and posted to
  W&B's host at exit, and the wandb-core service reports its own errors to W&B unless started with error reporting
  off. `WANDB_ERROR_REPORTING=false` turns off both, so it is set while an offline run starts (see `_offline_env`).
- One history row per write, never `run.log(..., step=)`: W&B drops (with a warning) any row whose `step=` is
  below the run's current step, which happens as soon as two writers disagree (Lightning's own `self.log` path
  logs without `step=`, a resumed run restarts below the last logged step). Instead every row carries the
  training step as the value `trainer/global_step`, the x-axis of every chart (the key Lightning's W&B logger
  already plots against), so no write can be dropped, whatever its order. W&B's own `_step` then counts
  writes; media panels' sliders may show it rather than the training step.
- `wandb` is imported inside functions: importing it costs about a second, and `import mlfab` must stay fast.
"""

import configparser
import html
import io
import netrc
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from typing_extensions import override

from mlfab.loggers.base import MlfabLogger
from mlfab.logs.values import Logs, finite, free_tag
from mlfab.state import LogPhase

STEP_METRIC = "trainer/global_step"  # The x-axis of every chart; Lightning's WandbLogger uses the same key.


def _text(value: str) -> Any:
    import wandb

    # Html rather than a one-cell Table: Html is media, shown like images in a media panel with a step
    # slider, so a sample written every few hundred steps can be scrubbed through; <pre> keeps newlines and
    # indentation, and escaping shows `<` and `&` literally. A Table is a JSON table file built for many rows:
    # for one string it only adds a column header and a grid around it.
    return wandb.Html(f'<pre style="white-space: pre-wrap">{html.escape(value)}</pre>', data_is_not_path=True)


def _video(frames: np.ndarray, fps: float) -> Any:
    import imageio_ffmpeg  # type: ignore[import-untyped]  # No type information; installed with moviepy.
    import wandb

    # MP4 (H.264, through the ffmpeg that moviepy bundles): a few times smaller and faster to encode than GIF
    # (measured on 60 frames of 128x128), and full colour where GIF has 256. Encoded here rather than by
    # wandb.Video from the array: that goes through moviepy's clip timing, which drops or repeats frames by float
    # rounding (7 frames at 12 fps came out as 6) and takes whole frame rates only (2.5 fps played as 2). The 4:2:0
    # pixel format that browsers play needs even sides, so an odd height or width is padded by repeating the last
    # row or column.
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        size = (frames.shape[2], frames.shape[1])
        writer = imageio_ffmpeg.write_frames(
            str(path),
            size,
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        writer.send(None)  # Starts ffmpeg.
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        video = wandb.Video(io.BytesIO(path.read_bytes()), format="mp4")
    # What wandb.Video records (as `width` and `height` in the row) when it encodes an array itself, which it does
    # not read back from a file: kept so the row has the same fields either way.
    video._height, video._width = frames.shape[1:3]
    return video


def write_wandb(run: Any, logs: Logs, prefix: str = "") -> None:
    """Writes every kind in `logs` as ONE history row of `run`, each tag as `prefix + tag`.

    The row also holds `trainer/global_step` (= `logs.step`), `trainer/num_samples` and
    `trainer/elapsed_time_s`; `WandbLogger` makes the step every chart's x-axis (Lightning's WandbLogger does too).
    A tag logged as two kinds in one write (a scalar and a histogram `w`) keeps both: the later kind, in the order
    scalar, string, image, audio, video, histogram, point cloud, is written as `<tag>/<kind>` (`w/histogram`).
    """
    import wandb

    row: dict[str, Any] = {
        STEP_METRIC: logs.step,
        "trainer/num_samples": logs.num_samples,
        "trainer/elapsed_time_s": logs.elapsed_time_s,
    }
    writers: dict[str, Callable[[Any], Any]] = {
        "scalar": float,
        "string": lambda text: _text(str(text)),
        "image": lambda image: wandb.Image(Image.fromarray(image)),  # From an array, wandb squeezes a 1-pixel side.
        "audio": lambda audio: wandb.Audio(audio.samples, sample_rate=audio.sample_rate),
        "video": lambda video: _video(video.frames, video.fps),
        "histogram": lambda values: wandb.Histogram(np_histogram=np.histogram(values, bins=64)),  # As wandb bins.
        "point_cloud": lambda cloud: wandb.Object3D(cloud.xyzrgb()),
    }
    taken: set[str] = set()  # Tags of this row: a tag logged as two kinds keeps both, the later as <tag>/<kind>.
    for kind, convert in writers.items():
        for tag, value in logs.of(kind).items():
            if kind == "histogram" and not (value := finite(value)).size:  # An all-NaN histogram is skipped.
                continue
            taken.add(name := free_tag(tag, kind, taken))
            row[prefix + name] = convert(value)
    run.log(row)


def _wandb_settings_file() -> dict[str, str]:
    path = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser() / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def has_wandb_credentials() -> bool:
    """True when `wandb.init` would find an API key without asking: the environment or a .netrc entry.

    Follows where wandb itself looks (WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, then $NETRC, ~/.netrc or
    ~/_netrc for the server's host), without importing wandb or touching the network.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or _wandb_settings_file().get("base_url") or "https://api.wandb.ai"
    host = urlsplit(base_url).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            try:
                auth = netrc.netrc(path).authenticators(host)
            except (OSError, netrc.NetrcParseError):
                return False
            return bool(auth and auth[2])
    return False


def resolve_mode(mode: str | None = None) -> str | None:
    """`mode` if given, else WANDB_MODE, else "offline" without credentials, else None (wandb decides: online
    unless `wandb offline` was run)."""
    return mode or os.environ.get("WANDB_MODE") or (None if has_wandb_credentials() else "offline")


LOCAL_MODES = ("offline", "dryrun", "disabled")  # Modes in which a run has no reason to reach W&B's servers.


@contextmanager
def _offline_env() -> Iterator[None]:
    """WANDB_ERROR_REPORTING=false while an offline run starts, unless the user set it.

    wandb reads it at `wandb.init`: its process-wide telemetry recorder, made at the first init, stays off
    (without it, the recorder's exporter resolved and posted to W&B's host at exit, offline or not), and the
    wandb-core service, started by the first init, gets `--no-observability`. Both live for the rest of the
    process, so the first W&B run of a process decides for the later ones (an online run first leaves them on).
    Set only around the init: the environment that training code and its subprocesses see is unchanged.
    """
    if "WANDB_ERROR_REPORTING" in os.environ:
        yield
        return
    os.environ["WANDB_ERROR_REPORTING"] = "false"
    try:
        yield
    finally:
        os.environ.pop("WANDB_ERROR_REPORTING", None)


def _save_file(run: Any, name: str, text: str) -> None:
    """`text` as the file `name` of `run`, uploaded with it (a disabled run, WANDB_MODE=disabled, has no files)."""
    if Path(run.dir).is_dir():
        path = Path(run.dir) / name
        path.write_text(text)
        run.save(str(path), base_path=run.dir, policy="now")


class WandbLogger(MlfabLogger, LightningWandbLogger):
    """A W&B run in `<exp_dir>/wandb`, written with mlfab's every kind (scalars, text, images, audio, video,
    histograms, point clouds).

    Train and valid values go to one W&B history, so tags are written as `train/<tag>` and `valid/<tag>`
    (`train/loss/loss`, `valid/loss/loss`; the names `dispatch` gives any single-stream logger), which W&B shows
    as one section per phase. Every row carries `trainer/global_step`, the charts' x-axis (see the module
    docstring for why no `step=` is passed). Lightning's `self.log` metrics (`log_metrics`) keep their own
    names and the same x-axis. `finalize` finishes the run (W&B's service writes its last records to disk a
    moment later), so the next launch in the same process gets a run of its own instead of reusing this one.

    Mode: `mode` if given; else WANDB_MODE; else offline when no W&B credentials are configured
    (WANDB_API_KEY or a .netrc entry), online otherwise. An offline or disabled run contacts no server (no
    telemetry, no error reports; see the module docstring) unless WANDB_ERROR_REPORTING is set. Project:
    `project`, else WANDB_PROJECT, else "mlfab"; name: `name`, else WANDB_NAME, else `<task>/<run_N>` from
    `exp_dir`. Other keyword arguments go to Lightning's WandbLogger / `wandb.init`.
    """

    def __init__(
        self,
        exp_dir: str | Path,
        project: str | None = None,
        name: str | None = None,
        log_interval_seconds: float | dict[LogPhase, float] = 2.0,
        mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        exp_dir = Path(exp_dir)
        resolved = resolve_mode(mode)
        if resolved is not None:
            kwargs["mode"] = resolved
        super().__init__(
            name=name or os.environ.get("WANDB_NAME") or "/".join(exp_dir.resolve().parts[-2:]),
            save_dir=str(exp_dir),  # wandb.init(dir=...) writes into <dir>/wandb.
            project=project or os.environ.get("WANDB_PROJECT") or "mlfab",
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # wandb 0.31 warns about the setting even when it is None.
            self._wandb_init.pop("anonymous", None)
        exp_dir.mkdir(parents=True, exist_ok=True)
        self._set_interval(log_interval_seconds)
        self.mode = resolved  # What wandb.init gets; None: wandb's own choice (online unless `wandb offline`).
        self._axis_run: Any = None

    @property
    @override
    def experiment(self) -> Any:
        if self._experiment is None and self.mode in LOCAL_MODES:  # wandb.init runs now: keep it off the network.
            with _offline_env():
                return super().experiment
        return super().experiment

    def _run(self) -> Any:
        run = self.experiment
        if run is not self._axis_run:  # Also for a run passed in as `experiment=`, which Lightning leaves alone.
            run.define_metric(STEP_METRIC)  # Every metric is plotted against the step `write_wandb` logs in each row.
            run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
            self._axis_run = run
        return run

    @rank_zero_only
    def write(self, logs: Logs) -> None:
        write_wandb(self._run(), logs, prefix=(f"{self._prefix}-" if self._prefix else "") + f"{logs.phase}/")

    @rank_zero_only
    def write_config(self, config_yaml: str) -> None:
        """The config becomes the run's config (filterable columns in W&B) and a file of the run."""
        run = self._run()
        if isinstance(config := yaml.safe_load(config_yaml), dict):
            run.config.update(config, allow_val_change=True)
        _save_file(run, "mlfab_config.yaml", config_yaml)

    @rank_zero_only
    def write_run_info(self, info: dict[str, str]) -> None:
        """The config as the run's config; provenance, git diff and the task's source as files of the run."""
        self.write_config(info["config"])
        for name, text in info.items():
            if name != "config":
                _save_file(self._run(), f"mlfab_{name}.txt", text)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        # An mlfab task's hyperparameters are {"config": {...}}: flatten them, so they match `write_config`'s
        # keys instead of repeating the whole config under "config.".
        if isinstance(params, dict) and set(params) == {"config"} and isinstance(params["config"], dict):
            params = params["config"]
        super().log_hyperparams(params)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            self._axis_run = None
