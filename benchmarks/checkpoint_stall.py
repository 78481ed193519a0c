"""How long a periodic checkpoint save blocks training (issue 16's baseline for asynchronous saving): an mlfab task
with about 100M parameters (default optimizer, so the checkpoint holds the evaluation and the training weights and
optimizer states) trains with `save_every_n_steps`; each `trainer.save_checkpoint` call is timed, and compared with
the median training step without a save.

    python benchmarks/checkpoint_stall.py [--params-millions 100] [--steps 12] [--every 4] [DIR]
"""

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

import mlfab
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


class StepTimes(Callback):
    """Wall time from one training batch's start to the next one's, and the time of each checkpoint save."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.saves: list[float] = []
        self._start: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        save = trainer.save_checkpoint

        def timed(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            save(*args, **kwargs)
            self.saves.append(time.perf_counter() - start)

        trainer.save_checkpoint = timed

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self.steps.append(now - self._start)
        self._start = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=None)
    parser.add_argument("--params-millions", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    width = int((args.params_millions * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        config = Config(width=width, max_steps=args.steps, save_every_n_steps=args.every, valid_every_n_steps=None,
                        exp_dir=tmp, valid_batches=1)  # fmt: skip
        task = Big(config)
        times = StepTimes()
        trainer = build_trainer(config, Path(tmp), [], [times])
        trainer.limit_val_batches = 0
        torch.manual_seed(0)
        trainer.fit(task)
        size = sum(p.stat().st_size for p in Path(tmp, "checkpoints").glob("*.ckpt"))
        files = len(list(Path(tmp, "checkpoints").glob("*.ckpt")))
    params = sum(p.numel() for p in task.parameters())
    # Steps with a save in them include it: leave the slowest (steps - saves) out of the no-save median.
    plain = sorted(times.steps)[: max(1, len(times.steps) - len(times.saves))]
    step, save = statistics.median(plain), statistics.median(times.saves)
    print(f"parameters: {params / 1e6:.1f} M; checkpoints: {files} files, {size / files / 1e9:.2f} GB each")
    print(f"training step without a save: {step:.3f} s (median)")
    print(f"a save blocks training for:   {save:.3f} s (median of {len(times.saves)}), {save / step:.1f} steps")


if __name__ == "__main__":
    main()
