"""A clean start: what Lightning prints around mlfab's header that a person does not need to read.

`install_quiet_start()` (once per process, before the Trainer is built) removes only what is named here:
- Lightning's tips ("💡 Tip: ... litlogger", "... litmodels"), which advertise its cloud services;
- its hardware lines ("GPU available: False (cuda), used: False", "TPU available: ..."): `hardware_line` says
  what the run uses instead, in mlfab's header. Its warning "GPU available but not used" stays;
- warnings from inside Lightning that an mlfab user cannot act on (`HARMLESS_WARNINGS`), each by its message,
  category and the Lightning module that raises it: the same text raised by any other module still shows.

`SummaryAfterHeader` (one of mlfab's Trainer callbacks) moves Lightning's model summary after mlfab's header.
"""

import logging
import re
import warnings
from pathlib import Path
from typing import Any

from typing_extensions import override

from mlfab._lightning import StepFreeCallback, strategy_name

# The loggers Lightning's `rank_zero_info` writes to (lightning.pytorch sets its own when it is imported).
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)
DROPPED_LINES = (
    re.compile(r"^\W*Tip: "),  # "💡 Tip: For seamless cloud logging ... litlogger ...", "... litmodels ..."
    re.compile(r"^(GPU|TPU|HPU) available: "),  # Trainer setup; mlfab's header has `hardware_line` instead.
)
# (message regex, category, module regex): warnings raised inside Lightning that an mlfab user cannot act on.
HARMLESS_WARNINGS = (
    # torch 2.10+ deprecates `LeafSpec`, which Lightning's `_tree_flatten` still builds (lightning 2.6).
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"(lightning\.pytorch|pytorch_lightning)\.utilities\._pytree$",
    ),
    # A relaunch that changes or turns off `save_every_n_*`: the checkpoint holds the state of mlfab's periodic
    # checkpoint callbacks the new launch no longer has (a callback of the user's in that list still shows).
    (
        r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
        r'`Trainer` instantiation\. Please add the following callbacks: \[("PeriodicCheckpoint\{[^"]*\}"(, )?)+\]\.$',
        UserWarning,
        r"(lightning\.pytorch|pytorch_lightning)\.trainer\.call$",
    ),
)
CHECKPOINT_MODULE = r"(lightning\.pytorch|pytorch_lightning)\.callbacks\.model_checkpoint$"
SUMMARY_LOGGER = "lightning.pytorch.callbacks.model_summary"  # Where Lightning's ModelSummary logs the table.


def _drop_lines(record: logging.LogRecord) -> bool:
    return not any(pattern.match(record.getMessage()) for pattern in DROPPED_LINES)


def install_quiet_start(checkpoint_dir: Path | None = None) -> None:
    """Installs the filters in this process; installing them again changes nothing. `checkpoint_dir`: a run's own
    `checkpoints` folder, whose "exists and is not empty" warning (at every resume: its checkpoints are meant to go
    on there) is dropped; the same warning about any other folder still shows."""
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_drop_lines)  # Not twice: `addFilter` skips a filter it has.
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)  # Replaces a twin.
    if checkpoint_dir is not None:
        own = rf"Checkpoint directory {re.escape(str(checkpoint_dir))} exists and is not empty\.$"
        warnings.filterwarnings("ignore", message=own, category=UserWarning, module=CHECKPOINT_MODULE)


def quiet_log_interval_warning() -> None:
    """Drops Lightning's "The number of training batches (6) is smaller than the logging interval
    Trainer(log_every_n_steps=50)" for a Trainer whose loggers are all mlfab's: they write by time
    (`log_interval_seconds`) and the command line refuses `log_every_n_steps`, so it advises what cannot be done.
    (For the rest of the process, as every filter here.)"""
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        module=r"(lightning\.pytorch|pytorch_lightning)\.loops\.fit_loop$",
    )


def hardware_line(trainer: Any) -> str:
    """What a Trainer runs on, for mlfab's header: `Hardware: cuda, 2 devices x 2 nodes, ddp, precision bf16-mixed`."""
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    devices = f"{trainer.num_devices} device{'s' if trainer.num_devices != 1 else ''}"
    if trainer.num_nodes > 1:
        devices += f" x {trainer.num_nodes} nodes"
    parts = [accelerator, devices]
    if trainer.world_size > 1:
        parts.append(strategy_name(trainer.strategy))
    return f"Hardware: {', '.join(parts)}, precision {trainer.precision}"


class _Hold(logging.Filter):
    """Keeps the records of a logger instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False


class SummaryAfterHeader(StepFreeCallback):
    """Shows Lightning's model summary after mlfab's header rather than inside it.

    Lightning logs the summary when fitting starts; mlfab's header ends with the run's records (commit, versions),
    written when training starts, once the config, the checkpoint and the data were accepted. The summary is held
    from setup until the first training batch, after every `on_train_start` hook, and then logged as Lightning
    made it: its own settings (`enable_model_summary`, a `ModelSummary(max_depth=...)` callback) still apply. A
    fit that trains no batch (a finished run relaunched, a failure before the first step) shows none. Lightning's
    `RichModelSummary` prints to the console directly and is not moved.
    """

    def __init__(self) -> None:
        self._hold: _Hold | None = None

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._hold is None:
            self._hold = _Hold()
            logging.getLogger(SUMMARY_LOGGER).addFilter(self._hold)
            self.__dict__.pop("on_train_batch_start", None)  # Called again, should this callback fit again.

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._release(show=True)
        # Lightning skips a hook that is not callable (see StepFreeCallback): the later steps cost nothing.
        setattr(self, "on_train_batch_start", None)  # noqa: B010

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release(show=False)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release(show=False)  # Lightning does not tear callbacks down after a failure.

    def _release(self, show: bool) -> None:
        if self._hold is None:
            return
        logger = logging.getLogger(SUMMARY_LOGGER)
        logger.removeFilter(self._hold)
        held, self._hold = self._hold.held, None
        for record in held if show else ():
            logger.handle(record)
