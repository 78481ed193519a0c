"""`mlfab.StdoutLogger`: progress and scalars on the terminal.

On a TTY the training line is redrawn in place (phase, step / max_steps, steps/s, ETA, scalars) and each
validation result is printed as a line of its own, as is each "metrics" write (what Lightning hands
`log_metrics`: `[metrics] step 4 | val_loss=0.25`). Otherwise (a log file, CI) every write is one plain
line with no escape codes.
"""

import datetime
import math
import sys
from collections.abc import Collection
from typing import TextIO

from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlfab.loggers.base import PlainLogger
from mlfab.logs.values import Logs
from mlfab.run.diagnostics import REMAINING_S, STEPS_PER_SECOND, TERMINAL_HIDDEN_TAGS
from mlfab.state import LogPhase


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


class StdoutLogger(PlainLogger):
    logger_name = "stdout"
    # mlfab's speed, time and memory diagnostics (their exact tags, mlfab/run/diagnostics.py) are left out of the
    # terminal line, which has its own steps/s and ETA; the file loggers keep them, and a task's own values in those
    # namespaces are shown. A subclass may show them too (`hidden_tags = frozenset()`) or hide others.
    hidden_tags: Collection[str] = TERMINAL_HIDDEN_TAGS

    def __init__(
        self,
        log_interval_seconds: float | dict[LogPhase, float] = 1.0,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ) -> None:
        super().__init__(log_interval_seconds)
        self._stream = stream
        self._tty = tty
        self._since: tuple[int, float] | None = None  # (steps done, elapsed_time_s) the next rate is measured from.
        self._live_line = False

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def is_tty(self) -> bool:
        return self._tty if self._tty is not None else self.stream.isatty()

    def write_run_info(self, info: dict[str, str]) -> None:
        """Only the short provenance summary: the config and sources are in the run directory."""
        if info.get("provenance"):
            self.stream.write(info["provenance"].rstrip() + "\n")
            self.stream.flush()

    def _rate(self, logs: Logs) -> tuple[float | None, str | None]:
        """Steps/s and the time left: mlfab's diagnostics of this step where the write has them (so the terminal
        and the files agree), else steps/s since this logger's last write and the steps left at that rate.
        `elapsed_time_s` is wall-clock time, validation included, so that window starts again at the end of each
        evaluation this logger writes (`write`)."""
        rate, left = logs.scalars.get(STEPS_PER_SECOND), logs.scalars.get(REMAINING_S)
        done = logs.step + 1  # Steps done: a training write's `step` is the step's own 0-based number.
        now, since = logs.elapsed_time_s, self._since
        if rate is None and since is not None and now is not None and done > since[0] and now > since[1]:
            rate = (done - since[0]) / (now - since[1])
        self._since = None if now is None else (done, now)  # (A time only a user's own write can leave unknown.)
        if left is None and rate and logs.max_steps:
            left = max(logs.max_steps - done, 0) / rate
        rate = rate if rate is not None and math.isfinite(rate) else None
        return rate, str(datetime.timedelta(seconds=round(left))) if left is not None and math.isfinite(left) else None

    def format(self, logs: Logs, rate: float | None = None, eta: str | None = None) -> str:
        parts = [f"[{logs.phase}] step {logs.step}" + (f"/{logs.max_steps}" if logs.max_steps else "")]
        if rate is not None:
            parts.append(f"{rate:.1f} steps/s")
        if eta is not None:
            parts.append(f"ETA {eta}")
        parts.extend(f"{tag}={_fmt(v)}" for tag, v in sorted(logs.scalars.items()) if tag not in self.hidden_tags)
        parts.extend(f"{tag}={text!r}" for tag, text in sorted(logs.of("string").items()))
        return " | ".join(parts)

    def write(self, logs: Logs) -> None:
        rate, eta = self._rate(logs) if logs.phase == "train" else (None, None)
        if logs.phase in ("valid", "test") and logs.elapsed_time_s is not None:
            self._since = logs.step, logs.elapsed_time_s  # An evaluation's step is the steps done; time from its end.
        line = self.format(logs, rate, eta)
        live = self.is_tty and logs.phase == "train"
        if live:
            self.stream.write("\r\033[K" + line)
        else:  # Ends a live training line first.
            self.stream.write(("\n" if self._live_line and self.is_tty else "") + line + "\n")
        self._live_line = live
        self.stream.flush()

    def end_live_line(self) -> None:
        """Ends the live training line (a newline), so that what is printed next starts a line of its own."""
        if self._live_line:
            self.stream.write("\n")
            self.stream.flush()
            self._live_line = False

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.end_live_line()
