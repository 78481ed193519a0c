"""What an mlfab logger is: a Lightning `Logger` that also takes mlfab's resolved `Logs`, with a write interval."""

from abc import ABC, abstractmethod
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlfab.logs.values import Logs
from mlfab.state import Phase


class MlfabLogger(ABC):
    """Mixin for Lightning loggers that understand every kind mlfab logs.

    `log_interval_seconds` is per phase: a flush is written when that many seconds passed since this
    logger's last write of the same phase (its first write of each phase always happens).
    """

    log_interval_seconds: dict[Phase, float]

    def _set_interval(self, seconds: float | dict[Phase, float]) -> None:
        if isinstance(seconds, dict):
            self.log_interval_seconds = {"train": 0.0, "valid": 0.0, "test": 0.0, **seconds}
        else:
            self.log_interval_seconds = {"train": float(seconds), "valid": 0.0, "test": 0.0}

    @abstractmethod
    def write(self, logs: Logs) -> None:
        """Writes one flush of resolved values."""

    def write_config(self, config_yaml: str) -> None:  # noqa: B027 - optional hook
        """Called once per run with the resolved config as YAML."""

    def write_run_info(self, info: dict[str, str]) -> None:
        """Called once per run with texts describing it: `config` (YAML), `provenance` (commit, versions),
        `git_diff` and `source` (the task's file) when known. By default: the config through
        `write_config`, the rest as strings under `run/<name>` at step 0."""
        self.write_config(info["config"])
        texts = {f"run/{name}": text for name, text in info.items() if name != "config"}
        if texts:
            self.write(Logs("train", 0, None, 0.0, 0, {"string": texts}))


class PlainLogger(MlfabLogger, Logger):
    """Base of the mlfab loggers built on Lightning's bare `Logger` (no Lightning backend underneath): a fixed
    `name`, no version, hyperparameters ignored unless overridden, and Lightning's own `self.log` metrics written
    as scalar `Logs`."""

    logger_name: str

    @property
    @override
    def name(self) -> str:
        return self.logger_name

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
        values = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        self.write(Logs("train", step or 0, None, 0.0, 0, {"scalar": values}))
