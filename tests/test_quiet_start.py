"""A clean start: mlfab's header first, then the model summary, without Lightning's tips, its hardware lines or
its known-harmless internal warnings, while other warnings (the user's) still show."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from mlfab.run.quiet import (
    RANK_ZERO_LOGGERS,
    SUMMARY_LOGGER,
    SummaryAfterHeader,
    hardware_line,
    install_quiet_start,
)
from mlfab.testing import BoringConfig, BoringTask

SCRIPT = """
import sys, warnings
from pathlib import Path
from typing import Any
from mlfab.run.quiet import install_quiet_start
from mlfab.testing import BoringConfig, BoringTask

install_quiet_start()


class Warns(BoringTask):
    def log_train_step(self, batch, output, state):
        if state.num_steps == 0:
            warnings.warn("a warning of the user's own code", UserWarning)


Warns.launch(BoringConfig(max_steps=2, save_every_n_steps=1, run_dir=sys.argv[1]), argv=[])
print("=== resume ===", flush=True)
(exp_dir,) = Path(sys.argv[1], "warns").iterdir()
Warns.launch(BoringConfig(max_steps=3, exp_dir=str(exp_dir)), argv=[])
"""


@pytest.mark.integration
def test_start_shows_header_then_summary_without_lightning_chatter(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONWARNINGS": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # One stream, in the order a terminal shows it.
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    unwanted = ("Tip:", "litlogger", "GPU available:", "TPU available:", "LeafSpec", "exists and is not empty")
    unwanted += ("callbacks used to create the checkpoint",)  # The resume turns save_every_n_steps off.
    for out in done.stdout.split("=== resume ===\n"):  # A new run, then a resumed one.
        for text in unwanted:
            assert text not in out, f"{text!r} in:\n{out}"
        assert "`Trainer.fit` stopped" in out  # Lightning's other lines stay.

        def line(text: str, out: str = out) -> int:
            return next(i for i, ln in enumerate(out.splitlines()) if text in ln)

        # The header (run directory, then the run's records), the model summary, then training.
        assert line("Run directory:") < line("versions: python") < line("Total params") < line("[train] step"), out
    assert "a warning of the user's own code" in done.stdout  # Other warnings are untouched.


@pytest.mark.unit
def test_warning_filter_is_narrow() -> None:
    """The known warning is ignored only when Lightning's own module raises it: the same text from elsewhere, and
    other warnings from that module, still show."""
    text = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install_quiet_start(Path("/runs/x/run_0/checkpoints"))
        install_quiet_start(Path("/runs/x/run_0/checkpoints"))  # Twice is once.
        for module in ("lightning.pytorch.utilities._pytree", "my_project.model"):
            warnings.warn_explicit(text, FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("something else", FutureWarning, "x.py", 2, module="lightning.pytorch.utilities._pytree")
        # The run's own checkpoints folder is meant to be reused; any other folder is the user's to hear about
        # (the filter matched every folder named `checkpoints`, for the rest of the process).
        for line, folder in enumerate(
            ("/runs/x/run_0/checkpoints", "/old/experiment/checkpoints", "/runs/x/run_01/checkpoints"), 3
        ):
            not_empty = f"Checkpoint directory {folder} exists and is not empty."
            warnings.warn_explicit(
                not_empty, UserWarning, "x.py", line, module="lightning.pytorch.callbacks.model_checkpoint"
            )
        # Lightning's "add the following callbacks" on a resume: mlfab's periodic ones are dropped, a user's shows.
        for line, keys in enumerate((["PeriodicCheckpoint{'a': 1}", "PeriodicCheckpoint{'b': 2}"], ["MyCallback"]), 6):
            missing = (
                "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided "
                f"during `Trainer` instantiation. Please add the following callbacks: {keys}."
            )
            warnings.warn_explicit(missing, UserWarning, "x.py", line, module="lightning.pytorch.trainer.call")
    expected = [(text, 1), ("something else", 2)]
    expected += [
        (f"Checkpoint directory {f} exists and is not empty.", n)
        for f, n in (("/old/experiment/checkpoints", 4), ("/runs/x/run_01/checkpoints", 5))
    ]
    expected.append((missing, 7))
    assert [(str(w.message), w.lineno) for w in caught] == expected


@pytest.mark.unit
def test_line_filter_is_narrow() -> None:
    """Only Lightning's tips and hardware lines, and only from its rank-zero logger, are dropped."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    rank_zero, other = logging.getLogger(RANK_ZERO_LOGGERS[0]), logging.getLogger("my_project")
    for logger in (rank_zero, other):
        logger.addHandler(handler)
    old_level = rank_zero.level
    rank_zero.setLevel(logging.INFO)
    other.setLevel(logging.INFO)
    try:
        install_quiet_start()
        for message in (
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)",
            "GPU available: False, used: False",
            "TPU available: False, using: 0 TPU cores",
            "`Trainer.fit` stopped: `max_steps=2` reached.",
        ):
            rank_zero.info(message)
        other.info("GPU available: False, used: False")
    finally:
        for logger in (rank_zero, other):
            logger.removeHandler(handler)
        rank_zero.setLevel(old_level)
    assert seen == ["`Trainer.fit` stopped: `max_steps=2` reached.", "GPU available: False, used: False"]


@pytest.mark.unit
def test_hardware_line_says_what_the_run_uses() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert hardware_line(trainer) == "Hardware: cpu, 1 device, precision 32-true"
    spawned = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False)
    assert hardware_line(spawned) == "Hardware: cpu, 2 devices, ddp_spawn, precision 32-true"  # Not "ddp".


@pytest.mark.unit
def test_summary_hold_is_released_after_a_failed_fit() -> None:
    """A fit that fails before its first batch leaves no filter behind to swallow a later fit's summary."""
    logger = logging.getLogger(SUMMARY_LOGGER)
    before = list(logger.filters)
    callback = SummaryAfterHeader()
    callback.setup(None, None, stage="fit")
    assert len(logger.filters) == len(before) + 1
    callback.on_exception(None, None, RuntimeError("no data"))
    assert logger.filters == before
    callback.setup(None, None, stage="validate")  # Lightning's summary comes only with fit.
    assert logger.filters == before


class SmallMapSet(BoringTask):
    """A map-style training set of 6 batches, fewer than Lightning's log_every_n_steps (50)."""

    extra_logger: bool = False

    def set_loggers(self) -> None:
        super().set_loggers()
        if self.extra_logger:
            self.add_logger(pl.loggers.CSVLogger(self.exp_dir))

    def get_dataset(self, phase: str) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return [(torch.randn(self.config.in_dim), torch.randn(1)) for _ in range(48)]


@pytest.mark.integration
@pytest.mark.parametrize("extra_logger", [False, True])
def test_lightnings_log_every_n_steps_advice_shows_only_where_a_logger_reads_it(
    tmp_path: Path, extra_logger: bool
) -> None:
    """mlfab's loggers write by time, and the command line refuses `log_every_n_steps`: Lightning's advice to lower it
    was shown at every run of a small map-style set. A Lightning logger of the run's still reads it."""
    SmallMapSet.extra_logger = extra_logger
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SmallMapSet.launch(BoringConfig(max_steps=2, exp_dir=str(tmp_path)), argv=[])
    advice = [w for w in caught if "is smaller than the logging interval" in str(w.message)]
    assert len(advice) == (1 if extra_logger else 0), [str(w.message) for w in caught]
