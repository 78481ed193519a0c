"""Resuming costs the same at step 10 and at step 100000: mlfab restores the data stream's position from the
checkpoint (random generator states and the batch in flight) instead of replaying earlier batches.

For each of two run directories, trains a random-sampling dpshdl dataset to step K (10, then --steps), then
relaunches into the run directory and times launch -> end of the first resumed optimizer step. Each resume
is repeated and the median reported.

    python benchmarks/resume_cost.py [--steps 100000] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from parity import quiet  # benchmarks/ is on the path when a script in it runs.

from mlfab.testing import BoringConfig, BoringTask


class Timed(BoringTask):
    first_step_at: float | None = None

    def on_train_batch_end(self, *args: Any) -> None:
        super().on_train_batch_end(*args)
        if Timed.first_step_at is None:
            Timed.first_step_at = time.perf_counter()


def config(exp_dir: Path, max_steps: int) -> BoringConfig:
    return BoringConfig(
        exp_dir=str(exp_dir), max_steps=max_steps, valid_every_n_steps=None, valid_batches=0, save_every_n_seconds=None
    )


def resume_seconds(exp_dir: Path, at_step: int) -> float:
    """Seconds from launch to the end of the first step after `at_step` (the run is trained back to it)."""
    Timed.first_step_at = None
    start = time.perf_counter()
    Timed.launch(config(exp_dir, at_step + 1), argv=[])
    assert Timed.first_step_at is not None
    return Timed.first_step_at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (10, args.steps):
            exp_dir = Path(tmp) / f"at_{steps}"
            t0 = time.perf_counter()
            Timed.launch(config(exp_dir, steps), argv=[])
            train_s = time.perf_counter() - t0
            times = []
            for i in range(args.repeats):
                # Each resume trains one step and saves, so the next resume starts one step later.
                times.append(resume_seconds(exp_dir, steps + i))
            rows.append((steps, train_s, statistics.median(times)))
    header = f"launch -> first resumed step (s, median of {args.repeats})"
    print(f"\n| resumed at step | time to train there (s) | {header} |")
    print("|---:|---:|---:|")
    for steps, train_s, resume_s in rows:
        print(f"| {steps} | {train_s:.1f} | {resume_s:.3f} |")
    print(f"\nratio (step {args.steps} / step 10): {rows[1][2] / rows[0][2]:.2f} (1.0 = no cost for steps trained)")


if __name__ == "__main__":
    main()
