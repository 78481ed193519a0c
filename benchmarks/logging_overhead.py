"""What logging the loss every step through mlfab costs, per training step, against not logging at all.

Both variants train the same tiny model on the same data in this process, alternating, and the medians
are compared. The logging variant has mlfab's default loggers attached (stdout and TensorBoard, with their
default write intervals); the baseline has no loggers and no `log_*` bookkeeping.

    python benchmarks/logging_overhead.py [--steps 3000] [--repeats 5]
"""

import argparse
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

import mlfab
from mlfab.testing import BoringConfig, BoringTask


class Silent(BoringTask):
    """The baseline: mlfab's `log_*` bookkeeping switched off."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self._log_buffer.add = lambda *args: None  # type: ignore[method-assign]


class StepTimer(pl.Callback):
    """Times the steps after the first `warmup` (dataloader start-up and first-step costs excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def seconds_per_step(task: BoringTask, loggers: list[Any], steps: int, warmup: int = 100) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, logger=loggers or False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, callbacks=[timer])
    trainer.fit(task)
    return (timer.end - timer.start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    config = BoringConfig(max_steps=None, valid_every_n_steps=None)
    logged, silent = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            loggers = [mlfab.StdoutLogger(stream=io.StringIO()), mlfab.TensorboardLogger(Path(tmp) / str(i))]
            logged.append(seconds_per_step(BoringTask(config), loggers, args.steps))
            silent.append(seconds_per_step(Silent(config), [], args.steps))
    with_logs, without = statistics.median(logged), statistics.median(silent)
    print(f"steps per run: {args.steps}, repeats: {args.repeats} (medians)")
    print(f"no logging:                {without * 1e3:.3f} ms/step")
    print(f"loss logged every step:    {with_logs * 1e3:.3f} ms/step")
    print(f"overhead:                  {(with_logs - without) * 1e3:+.3f} ms/step (target <= 0.100)")
    print(f"ratio logged / not logged: {with_logs / without:.3f}")


if __name__ == "__main__":
    main()
