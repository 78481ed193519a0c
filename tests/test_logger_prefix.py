"""A Lightning logger's `prefix=` applies to the values mlfab writes to it, as it does to the task's `self.log` values
(mlfab's own loggers apply theirs once)."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars


class SelfLogging(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("mine", loss)
        return loss


@pytest.mark.integration
def test_lightning_tensorboard_prefix_applies_to_mlfab_values(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="exp1")
    trainer = pl.Trainer(
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(SelfLogging(BoringConfig(max_steps=None)))
    tags = set(read_scalars(tmp_path / "tb" / "version_0"))
    assert {"exp1-mine", "exp1-train/loss/loss", "exp1-valid/loss/loss"} <= tags
    assert not any(tag.startswith(("train/", "valid/")) for tag in tags), tags


@pytest.mark.integration
def test_mlfab_tensorboard_logger_prefix_is_applied_once(tmp_path: Path) -> None:
    class Prefixed(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0, prefix="exp1"))

    Prefixed.launch(BoringConfig(max_steps=2, run_dir=str(tmp_path)), argv=[])
    (exp,) = (tmp_path / "prefixed").iterdir()
    tags = set(read_scalars(exp / "tensorboard" / "train"))
    assert "exp1-loss/loss" in tags
    assert not any(tag.startswith("exp1-exp1") for tag in tags), tags
