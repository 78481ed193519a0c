"""Values a task logs in Lightning's ways (`self.log` with epoch reductions, a torchmetrics Metric, an epoch-end
hook) reach mlfab's loggers with the value Lightning has and at the step they belong to."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torch.utils.data import TensorDataset

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration


class Json(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=self.interval))

    interval = 0.0

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        if phase == "train":  # Map-style: an epoch is 5 batches of 8.
            g = torch.Generator().manual_seed(0)
            return TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, generator=g))
        return TensorDataset(torch.zeros(16, 4), torch.full((16,), 100.0))  # Every validation target is 100.


def values(exp: Path, phase: str, key: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["scalars"][key]) for r in records if r["phase"] == phase and key in r.get("scalars", {})]


def test_a_validation_self_log_is_not_replaced_by_the_training_epochs_value(tmp_path: Path) -> None:
    """The same `self.log("ymean", ..., on_epoch=True)` in training and validation: once a training epoch ended,
    Lightning's `ymean_epoch` (the training mean) was written as the validation's value."""

    class Shared(Json):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            x, y = batch
            self.log("ymean", y.mean(), on_epoch=True)
            return F.mse_loss(self(x).squeeze(-1), y)

    Shared.launch(BoringConfig(max_steps=7, valid_every_n_steps=3, diagnostics=[], exp_dir=str(tmp_path)), argv=[])
    assert values(tmp_path, "valid", "ymean") == [(1, 100.0), (3, 100.0), (6, 100.0), (7, 100.0)]


def test_a_torchmetrics_metric_logged_in_training_is_each_steps_value(tmp_path: Path) -> None:
    """`self.metric(y); self.log("ymean", self.metric)`: Lightning logs the step's value; mlfab wrote the metric's
    running value since its last reset."""

    class Metric(Json):
        def __init__(self, config: BoringConfig) -> None:
            super().__init__(config)
            self.metric = torchmetrics.MeanMetric()

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            x, y = batch
            if state.phase == "train":
                self.metric(y)
                self.log("ymean", self.metric)
                self.log_scalar("truth", y.mean())
            return F.mse_loss(self(x).squeeze(-1), y)

    Metric.launch(BoringConfig(max_steps=4, valid_every_n_steps=None, diagnostics=[], exp_dir=str(tmp_path)), argv=[])
    logged, truth = values(tmp_path, "train", "ymean"), values(tmp_path, "train", "value/truth")
    assert [step for step, _ in logged] == [step for step, _ in truth] == [0, 1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in truth])


@pytest.mark.parametrize("interval", [0.0, 1000.0])
def test_values_logged_when_an_epoch_ends_are_written_at_its_last_step(tmp_path: Path, interval: float) -> None:
    """They were written with the next step (5 instead of 4), or, with a long logger interval, never."""

    class EpochEnd(Json):
        def on_train_epoch_end(self) -> None:
            self.log_scalar("epoch", float(self.current_epoch))

    EpochEnd.interval = interval
    EpochEnd.launch(
        BoringConfig(max_steps=12, valid_every_n_steps=None, diagnostics=[], exp_dir=str(tmp_path)), argv=[]
    )
    assert values(tmp_path, "train", "value/epoch") == [(4, 0.0), (9, 1.0), (11, 2.0)]


def test_exp_dir_before_the_run_is_the_configs() -> None:
    assert BoringTask(BoringConfig(exp_dir="~/runs/x")).exp_dir == Path("~/runs/x").expanduser()
    with pytest.raises(RuntimeError, match="set exp_dir in the config"):
        _ = BoringTask(BoringConfig()).exp_dir
