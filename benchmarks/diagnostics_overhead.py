"""What mlfab's diagnostics (mlfab/run/diagnostics.py: gradient norm, speed, time remaining, memory) cost per
training step.

The same tiny task is trained by the Trainer `mlfab.run.trainer.build_trainer` makes from its config, once with
`diagnostics` at its default (every group) and once with `diagnostics=[]`, in this process, alternating, and the
medians are compared. Both have mlfab's default loggers attached (stdout and TensorBoard, at their default write
intervals), so the lazy values are computed about once a second, as in a real run; no validation, no periodic
checkpoint. A third run per repeat times the diagnostics callback's own per-step hooks (its share of every step,
without Lightning's dispatch), which the end-to-end difference is too noisy to show on a busy machine.

    python benchmarks/diagnostics_overhead.py [--steps 3000] [--repeats 5]
"""

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from parity import lightning_classes, quiet  # benchmarks/ is on the path when a script in it runs.

import mlfab
from mlfab.run.diagnostics import Diagnostics
from mlfab.run.trainer import build_trainer
from mlfab.testing import BoringConfig, BoringTask

HOOKS = ("on_train_batch_start", "on_train_batch_end")
WARMUP = 100  # Steps before the timed ones.


def time_hooks(trainer: Any) -> dict[str, list[float]]:
    """Wraps the Diagnostics callback's per-step hooks to time each call; returns {hook: [seconds, ...]}."""
    (callback,) = [c for c in trainer.callbacks if isinstance(c, Diagnostics)]
    calls: dict[str, list[float]] = {}
    for name in HOOKS:
        hook = getattr(callback, name)
        if hook is None:
            continue

        def timed(*args: Any, _hook: Any = hook, _times: list[float] = calls.setdefault(name, [])) -> None:
            start = time.perf_counter()
            _hook(*args)
            _times.append(time.perf_counter() - start)

        setattr(callback, name, timed)
    return calls


def train(diagnostics: bool, steps: int, exp_dir: Path) -> float:
    """Seconds per step after the warmup."""
    trainer, task, timer = build(diagnostics, WARMUP + steps, exp_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # The model summary, "Saved checkpoint ...".
        trainer.fit(task)
    seconds_per_step: float = timer.run(steps).seconds_per_step
    return seconds_per_step


def hook_seconds(steps: int, exp_dir: Path) -> tuple[float, float]:
    """The diagnostics hooks' seconds per step, with every group on: (median step, mean step)."""
    trainer, task, _ = build(True, steps, exp_dir)
    calls = time_hooks(trainer)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(task)
    median = sum(statistics.median(times) for times in calls.values())
    mean = sum(sum(times) for times in calls.values()) / steps
    return median, mean


def build(diagnostics: bool, max_steps: int, exp_dir: Path) -> tuple[Any, BoringTask, Any]:
    """The Trainer `launch` would make for the config, the task, and a step timer (in the Trainer's callbacks)."""
    config = BoringConfig(
        max_steps=max_steps,
        valid_every_n_steps=None,
        valid_batches=0,
        save_every_n_seconds=None,
        precision="32-true",
        accelerator="cpu",
        devices=1,
        exp_dir=str(exp_dir),
    )
    if not diagnostics:
        config.diagnostics = []
    loggers = [mlfab.StdoutLogger(stream=io.StringIO()), mlfab.TensorboardLogger(exp_dir)]
    timer = lightning_classes()["StepTimer"](WARMUP)
    return build_trainer(config, exp_dir, loggers, [timer]), BoringTask(config), timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet()

    on: list[float] = []
    off: list[float] = []
    medians: list[float] = []
    means: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in ("on", "off")[:: 1 if i % 2 == 0 else -1]:  # Alternating which goes first.
                per_step = train(variant == "on", args.steps, Path(tmp) / f"{variant}{i}")
                (on if variant == "on" else off).append(per_step)
            median, mean = hook_seconds(args.steps, Path(tmp) / f"hooks{i}")
            medians.append(median)
            means.append(mean)
    with_diag, without = statistics.median(on), statistics.median(off)
    print(f"steps per run: {args.steps}, repeats: {args.repeats} (medians)")
    print(f"diagnostics off:           {without * 1e3:.3f} ms/step")
    print(f"diagnostics on (default):  {with_diag * 1e3:.3f} ms/step")
    print(f"difference:                {(with_diag - without) * 1e3:+.3f} ms/step")
    print(f"ratio on / off:            {with_diag / without:.3f}")
    print(f"diagnostics hooks alone:   {statistics.median(medians) * 1e6:.1f} us/step (median step; mean step "
          f"{statistics.median(means) * 1e6:.1f} us)")  # fmt: skip


if __name__ == "__main__":
    main()
