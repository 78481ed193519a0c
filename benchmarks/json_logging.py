"""What `mlfab.JsonLogger` costs per training step when it writes every step, against its default interval.

A logger that writes a step makes mlfab evaluate every lazy value (`self.log_scalar("x", lambda: ...)`) logged
for that step, so a logger that writes every step evaluates them all every step. Both variants train the same
tiny task with a JsonLogger attached and nothing else, in this process, alternating, and the medians are
compared. Each step logs, besides the loss, a lazy scalar (the weights' norm) and, with `--image`, a lazy
64x64 image (written as a PNG by every write).

    python benchmarks/json_logging.py [--steps 3000] [--repeats 5] [--image]
"""

import argparse
import inspect
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from logging_overhead import seconds_per_step  # benchmarks/ is on the path when a script in it runs.
from parity import quiet

import mlfab
from mlfab.testing import BoringConfig, BoringTask

VARIANTS = {"every step": 0.0, "default": None}  # JsonLogger's log_interval_seconds; None: its default.


class LazyLogged(BoringTask):
    """Logs a lazy scalar (and optionally a lazy image) every step and counts how often they are evaluated."""

    image = False

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.evaluations = 0

    def log_train_step(self, batch: Any, output: Any, state: mlfab.State) -> None:
        self.log_scalar("weight_norm", self._weight_norm)
        if self.image:
            self.log_image("sample", self._image)

    def _weight_norm(self) -> float:
        self.evaluations += 1
        return float(self.layer.weight.norm())

    def _image(self) -> np.ndarray:
        rng = np.random.default_rng(self.evaluations)
        return rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)


def run(interval: float | None, steps: int, image: bool, exp_dir: Path) -> tuple[float, int, int]:
    """Seconds per step, lazy evaluations and lines written for one run."""
    task = LazyLogged(BoringConfig(max_steps=None, valid_every_n_steps=None))
    task.image = image
    logger = mlfab.JsonLogger(exp_dir) if interval is None else mlfab.JsonLogger(exp_dir, log_interval_seconds=interval)
    per_step = seconds_per_step(task, [logger], steps)
    logger.finalize("success")
    return per_step, task.evaluations, len(logger.path.read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", action="store_true", help="Also log a lazy 64x64 image every step")
    args = parser.parse_args()
    quiet()

    default = inspect.signature(mlfab.JsonLogger).parameters["log_interval_seconds"].default
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in list(VARIANTS)[:: 1 if i % 2 == 0 else -1]:  # Alternating which goes first.
                exp_dir = Path(tmp) / f"{i}-{name.replace(' ', '_')}"
                per_step, evaluations, lines = run(VARIANTS[name], args.steps, args.image, exp_dir)
                times[name].append(per_step)
                counts[name] = (evaluations, lines)
    logged = "a lazy scalar and a lazy 64x64 image" if args.image else "a lazy scalar"
    print(f"steps per run: {args.steps} (+100 warmup), repeats: {args.repeats} (medians); logged: loss, {logged}")
    for name, label in (("every step", "every step"), ("default", f"default ({default:g} s)")):
        per_step, (evaluations, lines) = statistics.median(times[name]), counts[name]
        print(f"JsonLogger {label + ':':<16} {per_step * 1e3:.3f} ms/step, ", end="")
        print(f"{evaluations} lazy evaluations, {lines} lines")
    ratio = statistics.median(times["every step"]) / statistics.median(times["default"])
    print(f"ratio every step / default: {ratio:.3f}")


if __name__ == "__main__":
    main()
