"""What an mlfab logger is: a Lightning `Logger` that also takes mlfab's resolved `Logs`, with a write interval.

Write your own by subclassing `PlainLogger` (exported as `mlfab.PlainLogger`) and implementing `write(logs)`.
"""

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, get_args

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlfab.logs.values import Logs
from mlfab.state import LogPhase


class MlfabLogger(ABC):
    """Mixin for Lightning loggers that understand every kind mlfab logs.

    `log_interval_seconds` is per phase: a flush is written when that many seconds passed since this
    logger's last write of the same phase (its first write of each phase always happens).
    """

    log_interval_seconds: dict[LogPhase, float]

    def _set_interval(self, seconds: float | dict[LogPhase, float]) -> None:
        """A number sets `train`; a dict sets the phases it names. `train` not named keeps the logger's default
        (its `log_interval_seconds` default: a dict of other phases does not make it write every step); the
        other phases default to 0 (every evaluation is written)."""
        given: dict[LogPhase, float] = seconds if isinstance(seconds, dict) else {"train": seconds}
        bad = {k: v for k, v in given.items() if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0}
        if bad or any(math.isinf(v) for v in given.values()):  # None crashed at a later write; NaN wrote nothing.
            shown = ", ".join(f"{phase}: {value!r}" for phase, value in (bad or given).items())
            raise ValueError(
                f"{type(self).__name__}(log_interval_seconds=...) got {shown}: each interval is a finite number of "
                "seconds >= 0 (0 writes every step)."
            )
        if unknown := sorted(map(str, set(given) - set(get_args(LogPhase)))):  # A typo would silently do nothing.
            raise ValueError(
                f"{type(self).__name__}(log_interval_seconds=...) got phase(s) {', '.join(map(repr, unknown))}; "
                f"the phases are {', '.join(map(repr, get_args(LogPhase)))} (a number sets 'train' alone)."
            )
        param = inspect.signature(type(self).__init__).parameters.get("log_interval_seconds")
        train = param.default if param is not None and isinstance(param.default, int | float) else 2.0
        given = {phase: float(value) for phase, value in given.items()}
        self.log_interval_seconds = dict.fromkeys(get_args(LogPhase), 0.0) | {"train": float(train)} | given

    @abstractmethod
    def write(self, logs: Logs) -> None:
        """Writes one flush of resolved values."""

    def write_config(self, config_yaml: str) -> None:  # noqa: B027 - optional hook
        """Called once per run with the resolved config as YAML."""

    def resumed(self, steps: dict[LogPhase, int]) -> None:  # noqa: B027 - optional hook
        """The run resumed from a checkpoint: what an earlier launch wrote of each phase at `steps[phase]` or later
        came after that checkpoint (before a crash), and the resumed run writes those steps again."""

    def write_run_info(self, info: dict[str, str]) -> None:
        """Called once per run with texts describing it: `config` (YAML), `provenance` (commit, versions),
        `git_diff` and `source` (the task's file) when known. By default: the config through
        `write_config`, the rest as strings under `run/<name>` at step 0."""
        self.write_config(info["config"])
        texts = {f"run/{name}": text for name, text in info.items() if name != "config"}
        if texts:
            self.write(Logs("train", 0, None, 0.0, 0, {"string": texts}))


class PlainLogger(MlfabLogger, Logger):
    """The base class of your own logger (`mlfab.PlainLogger`); mlfab's JSON and stdout loggers are built on it.

    Implement one method, `write(self, logs)`, which gets every value logged for one write:

        class PrintLogger(mlfab.PlainLogger):
            def write(self, logs):
                for tag, value in logs.scalars.items():
                    print(logs.phase, logs.step, tag, value)
                for tag, pixels in logs.of("image").items():
                    Image.fromarray(pixels).save(f"{tag.replace('/', '_')}_{logs.step}.png")

        class MyTask(mlfab.Task[Config]):
            def set_loggers(self):
                self.add_logger(PrintLogger(log_interval_seconds=10))

    `logs` (`mlfab.logs.values.Logs`) holds `phase` ("train", "valid", "test", "predict", or "metrics", below),
    `step` (optimizer steps done), `max_steps`, `elapsed_time_s`, `num_samples` (None where unknown) and `values`,
    {kind: {tag: value}} with tags `<namespace>/<key>` (`loss/loss`, `value/accuracy`); `logs.of(kind)` is one
    kind's dict (empty when nothing of it was logged) and `logs.scalars` is `logs.of("scalar")`. Every value is
    resolved (lazy values computed, tensors converted) before `write` is called:
      "scalar": float; "string": str; "image": uint8 numpy array (H, W, 3), RGB, captions and grids drawn in;
      "audio": `Audio`, `.samples` float32 in [-1, 1], (T,) mono or (T, C), `.sample_rate`, `.wav` (WAV bytes);
      "video": `Video`, `.frames` uint8 (T, H, W, 3), `.fps`, `.gif` (animated GIF bytes);
      "histogram": float64 array of the raw values, flattened (may hold NaN / inf);
      "point_cloud": `PointCloud`, `.points` float32 (N, 3), `.colors` uint8 (N, 3) or None.
    A kind your logger cannot show can simply be ignored.

    When `write` is called: on rank zero only; for training, at most every `log_interval_seconds` seconds (a
    float for training, or {"train": s, "valid": s, "test": s}; validation and test default to every evaluation),
    the first training step, the last one and the step each validation follows always; for validation and test,
    once per evaluation. Optional hooks: `write_config(config_yaml)` (once per run, the resolved config),
    `write_run_info(info)` (once per run; by default the config goes to `write_config` and the provenance texts
    reach `write` as strings `run/<name>` at step 0), `finalize(status)` (Lightning's, at the end of the run:
    close files there). `name` is `logger_name` or the class name.

    It is a Lightning `Logger`, so it also works in a plain `lightning.pytorch.Trainer(logger=...)`. What Lightning
    hands its `log_metrics` (a plain LightningModule's `self.log` values, callbacks such as LearningRateMonitor; an
    mlfab task's own values come with their phase instead) reaches `write` as scalars with phase "metrics", at
    Lightning's step, with `max_steps`, `elapsed_time_s` and `num_samples` None: Lightning says neither the phase
    (the metric's name does: `val_loss`) nor the time or samples. Each such call is written (Lightning spaces them
    out itself, `log_every_n_steps`), whatever `log_interval_seconds` says.
    """

    logger_name: str = ""

    def __init__(self, log_interval_seconds: float | dict[LogPhase, float] = 2.0) -> None:
        super().__init__()
        self._set_interval(log_interval_seconds)

    @property
    @override
    def name(self) -> str:
        return self.logger_name or type(self).__name__

    @property
    @override
    def version(self) -> str:
        return ""

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:  # Lightning always gives one; writing 0 would put a later value at the start of the curve.
            raise ValueError(
                f"{type(self).__name__}.log_metrics({sorted(metrics)}) needs step=: "
                "mlfab's loggers write each value at a step"
            )
        values = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        self.write(Logs("metrics", step, None, None, None, {"scalar": values}))
