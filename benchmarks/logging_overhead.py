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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from parity import lightning_classes, quiet  # benchmarks/ is on the path when a script in it runs.

import mlfab
from mlfab.testing import BoringConfig, BoringTask


class Silent(BoringTask):
    """The baseline: mlfab's `log_*` bookkeeping switched off."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        for buffer in self._log_buffers.values():
            buffer.add = lambda *args: None  # type: ignore[method-assign]


def seconds_per_step(task: BoringTask, loggers: list[Any], steps: int, warmup: int = 100) -> float:
    timer = lightning_classes()["StepTimer"](warmup)
    trainer = pl.Trainer(
        max_steps=steps + warmup,
        logger=loggers or False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[timer],
    )
    trainer.fit(task)
    return timer.run(steps).seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet()

    config = BoringConfig(max_steps=None, valid_every_n_steps=None)
    logged, silent = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in ("logged", "silent")[:: 1 if i % 2 == 0 else -1]:  # Alternating which goes first.
                if variant == "logged":
                    loggers = [mlfab.StdoutLogger(stream=io.StringIO()), mlfab.TensorboardLogger(Path(tmp) / str(i))]
                    logged.append(seconds_per_step(BoringTask(config), loggers, args.steps))
                else:
                    silent.append(seconds_per_step(Silent(config), [], args.steps))
    with_logs, without = statistics.median(logged), statistics.median(silent)
    print(f"steps per run: {args.steps}, repeats: {args.repeats} (medians)")
    print(f"no logging:                {without * 1e3:.3f} ms/step")
    print(f"loss logged every step:    {with_logs * 1e3:.3f} ms/step")
    print(f"overhead:                  {(with_logs - without) * 1e3:+.3f} ms/step (target <= 0.100)")
    print(f"ratio logged / not logged: {with_logs / without:.3f}")


if __name__ == "__main__":
    main()
