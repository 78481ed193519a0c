"""Each scalar weighs as many samples as the batch it is logged for, also when it is logged before the step's own
code runs (a callback's `on_*_batch_start`, a `validation_step` override before `super()`); a value logged after the
evaluation's batches (`on_validation_epoch_end`, `on_validation_end`) weighs as one full batch. Batches of 4, 4 and 2
samples numbered 0..9 mean 4.5; weighted by the previous batch's size they came out 6.39."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration

SAMPLES = 10  # In batches of 4, 4 and 2.


def sample(i: int) -> tuple[np.ndarray, np.float32]:
    return np.full((4,), float(i), np.float32), np.float32(i)


class Numbered(Dataset[tuple[np.ndarray, np.float32]]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        return sample(i)


class NumberedStream(IterableDataset[tuple[np.ndarray, np.float32]]):
    """The training set: an iterable one keeps its last, short batch (a map-style one drops it)."""

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.float32]]:
        return map(sample, range(SAMPLES))


def labels(batch: Any) -> Tensor:
    return (batch["y"] if isinstance(batch, dict) else batch[1]).float().mean()


class LogsAtBatchStart(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log_scalar("callback_y", labels(batch))

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        pl_module.log_scalar("callback_y", labels(batch))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.log_scalar("epoch_end_y", 100.0)


class Weighed(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0))

    def configure_callbacks(self) -> list[pl.Callback]:
        return [*super().configure_callbacks(), LogsAtBatchStart()]

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return NumberedStream() if phase == "train" else Numbered()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self.log_scalar("before_super_y", labels(batch))
        return super().validation_step(batch, batch_idx)

    def log_valid_step(self, batch: Any, output: Any, state: mlfab.State) -> None:
        self.log_scalar("also_late_y", labels(batch))
        self.log_scalar("epoch_end_y", labels(batch))
        self.log_scalar("task_epoch_end_y", labels(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_scalar("task_epoch_end_y", 100.0)

    def on_validation_end(self) -> None:
        super().on_validation_end()
        self.log_scalar("also_late_y", 100.0)


class TransfersItsOwnWay(Weighed):
    """Moves batches itself (no super()) and turns each into a dict after the move, which get_num_samples reads: the
    batch was counted inside Task's transfer_batch_to_device, before that, or not at all."""

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return [part.to(device) for part in batch]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {"x": batch[0], "y": batch[1]}

    def get_num_samples(self, batch: Any) -> int:
        return len(batch["y"])

    def get_loss(self, batch: Any, state: mlfab.State) -> Tensor:
        return super().get_loss((batch["x"], batch["y"]), state)


@pytest.mark.parametrize("task", [Weighed, TransfersItsOwnWay])
def test_values_logged_before_the_step_weigh_as_their_batch(tmp_path: Path, task: type[Weighed]) -> None:
    config = BoringConfig(exp_dir=str(tmp_path), max_steps=1, batch_size=4, valid_every_n_steps=1, valid_batches=3)
    task.launch(config, argv=["batches_per_step=3"])
    lines = [json.loads(line) for line in (tmp_path / "json" / "log.jsonl").read_text().splitlines()]
    (train,) = (line["scalars"] for line in lines if line["phase"] == "train")
    (valid,) = (line["scalars"] for line in lines if line["phase"] == "valid")
    assert train["value/callback_y"] == pytest.approx(4.5)
    assert valid["value/callback_y"] == pytest.approx(4.5)
    assert valid["value/before_super_y"] == pytest.approx(4.5)
    late = (4.5 * SAMPLES + 100.0 * 4) / (SAMPLES + 4)  # As one full batch, not the last one (2 samples).
    assert [valid[f"value/{key}"] for key in ("also_late_y", "epoch_end_y", "task_epoch_end_y")] == [
        pytest.approx(late)
    ] * 3


def test_the_counted_batch_is_let_go_once_its_step_read_it() -> None:
    """The count held the last batch (on the device) through the validation after it, and after the run."""
    task = Weighed(BoringConfig(batch_size=4, max_steps=2))
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=3, limit_val_batches=1, logger=False)
    trainer.fit(task)
    assert task._counted[0] is None


def test_values_logged_at_batch_start_weigh_as_their_batch_under_an_accumulation_schedule(tmp_path: Path) -> None:
    """A GradientAccumulationScheduler starts the Trainer at one batch a step and sets its own count at each epoch:
    the batches' counts are still taken before their batch-start hooks."""
    task = Weighed(BoringConfig(exp_dir=str(tmp_path), batch_size=4, max_steps=1, valid_every_n_steps=None))
    schedule = pl.callbacks.GradientAccumulationScheduler({0: 3})
    logger = mlfab.JsonLogger(tmp_path, log_interval_seconds=0)
    trainer = pl.Trainer(
        max_steps=1, callbacks=[schedule], limit_val_batches=0, logger=logger, enable_progress_bar=False
    )
    trainer.fit(task)
    lines = [json.loads(line) for line in (tmp_path / "json" / "log.jsonl").read_text().splitlines()]
    (train,) = (line["scalars"] for line in lines if line["phase"] == "train")
    assert train["value/callback_y"] == pytest.approx(4.5)
