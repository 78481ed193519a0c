"""What Lightning hands a logger's `log_metrics` (a plain LightningModule's `self.log`, LearningRateMonitor) reaches
mlfab's loggers with phase "metrics" and no time or sample count: it was written as phase "train" with
`elapsed_time_s: 0.0, num_samples: 0`, so a validation metric read as a training value and the numbers were wrong."""

import csv
import io
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import mlfab
from mlfab.logs.values import Logs


class Plain(pl.LightningModule):
    """A plain LightningModule, no mlfab: a training and a validation metric through `self.log`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def val_dataloader(self) -> DataLoader:
        return self.loader()

    @staticmethod
    def loader() -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 2, generator=generator), torch.randn(32, 1, generator=generator))
        return DataLoader(data, batch_size=4)


def fit(tmp_path: Path, *loggers: Any, **kwargs: Any) -> CSVLogger:
    """Four steps, validation after steps 2 and 4; Lightning's CSVLogger alongside records Lightning's own steps."""
    csv_logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=[*loggers, csv_logger],
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(Plain())
    return csv_logger


def lightning_steps(csv_logger: CSVLogger, name: str) -> list[int]:
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get(name)]


def json_lines(exp_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp_dir / "json" / "log.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_json_lines_of_a_plain_modules_metrics_say_metrics_and_no_time_or_samples(tmp_path: Path) -> None:
    csv_logger = fit(tmp_path, mlfab.JsonLogger(tmp_path / "run"))
    lines = json_lines(tmp_path / "run")
    valid = [line for line in lines if "val_loss" in line.get("scalars", {})]
    train = [line for line in lines if "train_loss" in line.get("scalars", {})]

    # At the step Lightning gives them (its CSVLogger's), not as training values with made-up time and samples.
    assert [line["step"] for line in valid] == lightning_steps(csv_logger, "val_loss") == [1, 3]
    assert [line["step"] for line in train] == lightning_steps(csv_logger, "train_loss") == [0, 1, 2, 3]
    for line in valid + train:
        assert (line["phase"], line["elapsed_time_s"], line["num_samples"]) == ("metrics", None, None), line
        assert "epoch" not in line["scalars"]  # Lightning's own bookkeeping.
    assert "null" in (tmp_path / "run" / "json" / "log.jsonl").read_text()  # JSON's null: what pandas reads as NaN.
    assert not [line for line in lines if line["phase"] == "train"]  # Nothing a plain module logs is mlfab training.


@pytest.mark.integration
def test_a_custom_plain_logger_gets_phase_metrics_at_every_call(tmp_path: Path) -> None:
    class Collecting(mlfab.PlainLogger):
        def __init__(self) -> None:
            super().__init__(log_interval_seconds=1e6)  # Not the cadence of these writes: Lightning spaces them out.
            self.seen: list[Logs] = []

        def write(self, logs: Logs) -> None:
            self.seen.append(logs)

    logger = Collecting()
    fit(tmp_path, logger)
    assert {(logs.phase, logs.max_steps, logs.elapsed_time_s, logs.num_samples) for logs in logger.seen} == {
        ("metrics", None, None, None)
    }
    assert [logs.step for logs in logger.seen if "val_loss" in logs.scalars] == [1, 3]
    assert [logs.step for logs in logger.seen if "train_loss" in logs.scalars] == [0, 1, 2, 3]


@pytest.mark.integration
def test_the_terminal_prints_each_metrics_write_as_a_line_of_its_own(tmp_path: Path) -> None:
    """On a terminal a "train" write is the live line, redrawn in place: a validation metric written as "train"
    overwrote it and was overwritten by the next one."""
    out = io.StringIO()
    fit(tmp_path, mlfab.StdoutLogger(stream=out, tty=True))
    text = out.getvalue()
    assert "\r" not in text and "\033" not in text  # No live line: every write stays on the screen.
    lines = text.splitlines()
    assert [line.split(" | ")[0] for line in lines if "val_loss" in line] == ["[metrics] step 1", "[metrics] step 3"]
    assert len([line for line in lines if line.startswith("[metrics] step ")]) == len(lines) == 6  # 4 train, 2 val.


@pytest.mark.unit
def test_a_metrics_line_ends_the_live_training_line_and_the_next_training_line_starts_anew() -> None:
    out = io.StringIO()
    logger = mlfab.StdoutLogger(stream=out, tty=True)
    logger.write(Logs("train", 3, 10, 1.0, 32, {"scalar": {"loss/loss": 1.5}}))
    logger.log_metrics({"lr-SGD": 0.1, "epoch": 0.0}, step=3)
    logger.write(Logs("train", 4, 10, 2.0, 40, {"scalar": {"loss/loss": 1.25}}))
    assert out.getvalue() == (
        "\r\033[K[train] step 3/10 | loss/loss=1.5"
        "\n[metrics] step 3 | lr-SGD=0.1\n"
        "\r\033[K[train] step 4/10 | 1.0 steps/s | ETA 0:00:05 | loss/loss=1.25"  # The rate skips the metrics line.
    )


@pytest.mark.integration
def test_learning_rate_monitor_lines_in_an_mlfab_run_say_metrics_and_mlfabs_own_keep_train(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from mlfab.testing import BoringConfig, BoringTask

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=mlfab.JsonLogger(tmp_path, log_interval_seconds=0.0),
        callbacks=[LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringTask(BoringConfig()))
    lines = [line for line in json_lines(tmp_path) if "scalars" in line]
    monitored = [line for line in lines if any(tag.startswith("lr-") for tag in line["scalars"])]
    assert [(line["phase"], line["step"], line["elapsed_time_s"], line["num_samples"]) for line in monitored] == [
        ("metrics", step, None, None) for step in range(3)
    ]
    own = [line for line in lines if "loss/loss" in line["scalars"]]
    assert [line["phase"] for line in own] == ["train"] * 3
    assert all(line["elapsed_time_s"] > 0 and line["num_samples"] > 0 for line in own)  # mlfab knows these.


@pytest.mark.unit
def test_a_resume_line_supersedes_metrics_lines_as_it_does_training_lines(tmp_path: Path) -> None:
    """A crashed launch wrote metrics at steps 6 and 7 after the checkpoint at step 6; the resumed run writes them
    again. Written as "train", the resume line's training step covered them; as "metrics" it names them itself."""
    crashed = mlfab.JsonLogger(tmp_path)
    for step in (5, 6, 7):
        crashed.log_metrics({"lr-SGD": 0.1}, step=step)
    crashed.finalize("failed")
    resumed = mlfab.JsonLogger(tmp_path)
    resumed.resumed({"train": 6, "valid": 7})
    for step in (6, 7):
        resumed.log_metrics({"lr-SGD": 0.2}, step=step)
    resumed.finalize("success")

    kept: list[dict[str, Any]] = []
    for line in json_lines(tmp_path):
        if line["phase"] == "resume":
            assert line["steps"] == {"train": 6, "valid": 7, "metrics": 6}
            kept = [k for k in kept if k["step"] < line["steps"].get(k["phase"], k["step"] + 1)]
        else:
            kept.append(line)
    assert [(k["step"], k["scalars"]["lr-SGD"]) for k in kept] == [(5, 0.1), (6, 0.2), (7, 0.2)]


@pytest.mark.unit
def test_a_direct_log_metrics_call_without_a_step_is_refused_not_written_at_step_0(tmp_path: Path) -> None:
    """Lightning always passes `step=`; a user's own call without one was written at step 0, the start of the
    curve, whatever step training was at."""
    logger = mlfab.JsonLogger(tmp_path)
    with pytest.raises(ValueError, match=r"JsonLogger\.log_metrics\(\['lr'\]\) needs step="):
        logger.log_metrics({"lr": 0.1})
    logger.log_metrics({"lr": 0.1}, step=7)
    logger.finalize("success")
    lines = [json.loads(line) for line in (tmp_path / "json" / "log.jsonl").read_text().splitlines()]
    assert [(line["phase"], line["step"], line["scalars"]) for line in lines] == [("metrics", 7, {"lr": 0.1})]
