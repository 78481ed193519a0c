"""How long a periodic checkpoint save blocks training, written synchronously and in the background
(`async_checkpoints`, issue 16), side by side in one process: an mlfab task with about 100M parameters (default
optimizer, so the checkpoint holds the evaluation and the training weights and optimizer states) trains with
`save_every_n_steps`, once with `async_checkpoints=false` and once with `async_checkpoints=true`.

Training is blocked by a save for the time of the save call (for a background save: waiting for the previous write
and copying the checkpoint to memory) plus what the write, running beside training, slows the steps it overlaps by.
Both are counted the same way for both runs: over the steps whose time overlaps a periodic save (from the save
call to the end of its write), the time each takes beyond the run's median step that overlaps none, summed and
divided by the number of saves. The ratio async / sync is the figure issue 16 sets a target for (<= 0.20).
Printed apart: the save call alone (what training waits for), and the slowed steps beside the write with how much
the same number of steps without a save vary (1.4826 MAD x sqrt(n)), to tell a slowdown from noise. The final save
(`last.ckpt`, always synchronous, after any background write) is shown apart.

The background writer runs at the lowest CPU priority, on the CPU time training leaves: where training keeps every
core busy (this benchmark on a small CPU machine) a write takes several times as long as a synchronous one, and a
save that comes before it finished waits for it (the script says so). The default cadence leaves it the time on a
2-core machine; `--threads 1` leaves a core free, as a GPU's training loop does. `--async-first` swaps the order of
the two runs.

    python benchmarks/checkpoint_stall.py [--params-millions 100] [--steps 119] [--every 40] [--threads N]
                                          [--async-first] [DIR]
"""

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

import mlfab
from mlfab.checkpoints import AtomicCheckpointIO
from mlfab.run.trainer import build_trainer
from mlfab.testing import RegressionDataset


@dataclass(kw_only=True)
class Config(mlfab.Config):
    batch_size: int = mlfab.field(16)
    width: int = mlfab.field(10_000, help="Width of the square layer: width^2 parameters")


class Big(mlfab.Task[Config]):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.layer = nn.Linear(config.width, config.width)

    def get_dataset(self, phase: mlfab.Phase) -> RegressionDataset:
        return RegressionDataset(self.config.width, seed=0 if phase == "train" else 1)

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x, y = batch
        return (self.layer(x).mean(-1) - y).pow(2).mean()


@dataclass
class Timeline:
    """When each training batch started, and for each save: its file, the save call and the write (from the start
    of the call; for a background save, the write in its thread)."""

    batch_starts: list[float] = field(default_factory=list)
    calls: list[tuple[str, float, float]] = field(default_factory=list)
    io_calls: dict[str, float] = field(default_factory=dict)  # The checkpoint IO's part of each call.
    write_ends: dict[str, float] = field(default_factory=dict)


class Recorder(Callback):
    def __init__(self, timeline: Timeline) -> None:
        self.t = timeline

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        save = trainer.save_checkpoint

        def timed(filepath: Any, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            save(filepath, *args, **kwargs)
            self.t.calls.append((Path(filepath).name, start, time.perf_counter()))

        trainer.save_checkpoint = timed
        io = trainer.strategy.checkpoint_io
        io_save = io.save_checkpoint

        def timed_io(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            start = time.perf_counter()
            io_save(checkpoint, path, storage_options)
            self.t.io_calls[Path(path).name] = time.perf_counter() - start

        io.save_checkpoint = timed_io
        atomic = getattr(io, "checkpoint_io", io)
        assert isinstance(atomic, AtomicCheckpointIO)
        write = atomic.save_checkpoint

        def timed_write(checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            write(checkpoint, path, storage_options)
            self.t.write_ends[Path(path).name] = time.perf_counter()

        atomic.save_checkpoint = timed_write  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.t.batch_starts.append(time.perf_counter())


@dataclass
class Result:
    step: float  # Median step overlapping no save.
    blocked: float  # Per periodic save.
    slowed: float  # Of which: what the write added to the steps without a save call in them, per periodic save.
    noise: float  # The spread of `slowed` were the write to slow nothing: steps without a save vary that much.
    call: float  # Median periodic save call.
    io_call: float  # Its checkpoint IO part (the rest: the Trainer and the task collecting the checkpoint).
    write: float  # Median periodic save, call start to write end.
    final_call: float
    saves: int
    waited: int  # Saves whose call came while the previous write was still in flight (so it waited for it).
    final_waited: float  # How long of the final save call was spent waiting for a background write.
    size: int
    wall: float


def measure(timeline: Timeline, size: int, wall: float) -> Result:
    starts = timeline.batch_starts
    steps = [(a, b) for a, b in zip(starts, starts[1:], strict=False)]
    periodic = [(name, start, end) for name, start, end in timeline.calls if name != "last.ckpt"]
    windows = [(start, max(end, timeline.write_ends[name])) for name, start, end in periodic]

    def overlaps(a: float, b: float) -> bool:
        return any(a < w1 and w0 < b for w0, w1 in windows)

    clean = [b - a for a, b in steps if not overlaps(a, b)]
    median = statistics.median(clean)
    extra = sum(max(0.0, b - a - median) for a, b in steps if overlaps(a, b))
    alone = [not any(a <= start < b for _, start, _ in timeline.calls) for a, b in steps]  # No save call in it.
    beside = [b - a for (a, b), no_call in zip(steps, alone, strict=True) if no_call and overlaps(a, b)]
    slowed = sum(max(0.0, t - median) for t in beside)
    # The same sum over as many steps without a save, from their spread (1.4826 MAD: a robust standard deviation).
    spread = 1.4826 * statistics.median(abs(t - median) for t in clean)
    noise = spread * len(beside) ** 0.5
    final = [end - start for name, start, end in timeline.calls if name == "last.ckpt"]
    final_start = next((start for name, start, _ in timeline.calls if name == "last.ckpt"), float("inf"))
    final_waited = max(0.0, max(w1 for _, w1 in windows) - final_start)
    # Per periodic save that a measured step (batch start to next batch start) holds: one called after the last
    # batch started (`--steps` a multiple of `--every`) blocks no measured step and is not counted.
    measured = max(1, sum(any(a <= start < b for a, b in steps) for _, start, _ in periodic))
    return Result(
        step=median,
        blocked=extra / measured,
        slowed=slowed / measured,
        noise=noise / measured,
        call=statistics.median(end - start for _, start, end in periodic),
        io_call=statistics.median(timeline.io_calls[name] for name, _, _ in periodic),
        write=statistics.median(w1 - w0 for w0, w1 in windows),
        final_call=final[0] if final else float("nan"),
        saves=len(periodic),
        final_waited=final_waited,
        waited=sum(start < w1 for (_, start, _), (_, w1) in zip(periodic[1:], windows, strict=False)),
        size=size,
        wall=wall,
    )


def run(width: int, steps: int, every: int, background: bool, parent: str | None) -> Result:
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        config = Config(width=width, max_steps=steps, save_every_n_steps=every, valid_every_n_steps=None,
                        save_every_n_seconds=None, exp_dir=tmp, valid_batches=1,
                        async_checkpoints=background)  # fmt: skip
        task = Big(config)
        timeline = Timeline()
        trainer = build_trainer(config, Path(tmp), [], [Recorder(timeline)])
        trainer.limit_val_batches = 0
        torch.manual_seed(0)
        start = time.perf_counter()
        trainer.fit(task)
        wall = time.perf_counter() - start
        size = (Path(tmp) / "checkpoints" / "last.ckpt").stat().st_size
    return measure(timeline, size, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=None, help="Where the runs write (a temporary directory in it)")
    parser.add_argument("--params-millions", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=119)
    parser.add_argument("--every", type=int, default=40, help="save_every_n_steps: leave the write time to finish")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads for training (default: all)")
    parser.add_argument("--async-first", action="store_true", help="Run the background-saving run first")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    width = int((args.params_millions * 1e6) ** 0.5)
    if args.async_first:  # The order's own effect (the second run of a process may run slower or faster).
        bg = run(width, args.steps, args.every, background=True, parent=args.dir)
        sync = run(width, args.steps, args.every, background=False, parent=args.dir)
    else:
        sync = run(width, args.steps, args.every, background=False, parent=args.dir)
        bg = run(width, args.steps, args.every, background=True, parent=args.dir)
    print(f"parameters: {(width * width + width) / 1e6:.1f} M; checkpoint: {sync.size / 1e9:.2f} GB; training on "
          f"{torch.get_num_threads()} of {os.cpu_count()} CPU threads")  # fmt: skip
    print(f"{'':28}{'sync':>10}{'async':>10}")
    rows = [
        ("training step (median)", sync.step, bg.step),
        ("save call (median)", sync.call, bg.call),
        ("  of which checkpoint IO", sync.io_call, bg.io_call),
        ("save call to write end", sync.write, bg.write),
        ("final save call", sync.final_call, bg.final_call),
        ("run wall time", sync.wall, bg.wall),
    ]
    for label, a, b in rows:
        print(f"{label + ' s':28}{a:10.3f}{b:10.3f}")
    print(f"training blocked per periodic save: sync {sync.blocked:.3f} s, async {bg.blocked:.3f} s "
          f"(over {sync.saves} and {bg.saves} saves; of which steps slowed by the write beside them: "
          f"{bg.slowed:.3f} s, where steps without a save vary by +-{bg.noise:.3f} s over as many)")  # fmt: skip
    print(f"save call alone (training waits for it): sync {sync.call:.3f} s, async {bg.call:.3f} s, "
          f"ratio {bg.call / sync.call:.3f}")  # fmt: skip
    if bg.final_waited:
        print(f"the final save waited {bg.final_waited:.3f} s for the last background write")
    if bg.waited:
        print(f"{bg.waited} of {bg.saves} background saves waited for the write before them: save less often "
              "(--every) for a figure of the write hidden")  # fmt: skip
    print(f"ratio async/sync: {bg.blocked / sync.blocked:.3f} (target <= 0.20)")


if __name__ == "__main__":
    main()
