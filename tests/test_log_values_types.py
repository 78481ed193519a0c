"""Lightning's `self.log` in an mlfab task takes what Lightning takes: numbers of any kind (Python, numpy scalars, 0-d
numpy arrays), one-element tensors and torchmetrics Metrics, each written to mlfab's loggers; anything else is
refused at the call with the key and the type."""

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchmetrics
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration

NUMPY_VALUES: dict[str, Any] = {
    "np_float32": np.float32(1.5),
    "np_float64": np.float64(-2.25),
    "np_int64": np.int64(3),
    "np_bool": np.bool_(True),
    "np_0d_array": np.array(2.5, dtype=np.float32),
    "python_float": 0.75,
}


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": mlfab.JsonLogger(tmp_path / "run", log_interval_seconds=0.0),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        "max_steps": 2,
        "limit_val_batches": 2,
        "val_check_interval": 2,
        "check_val_every_n_epoch": None,
    }
    return pl.Trainer(**{**settings, **kwargs})


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "json" / "log.jsonl").read_text().splitlines()]


class NumpyValues(BoringTask):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        for name, value in NUMPY_VALUES.items():
            self.log(f"train_{name}", value)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        for name, value in NUMPY_VALUES.items():
            self.log(f"valid_{name}", value)
        return super().validation_step(batch, batch_idx)


def test_numpy_scalars_and_0d_arrays_logged_with_self_log_reach_the_loggers(tmp_path: Path) -> None:
    trainer(tmp_path).fit(NumpyValues(BoringConfig(max_steps=2)))

    lines = json_lines(tmp_path / "run")
    expected = {name: float(value) for name, value in NUMPY_VALUES.items()}
    train = [line["scalars"] for line in lines if line["phase"] == "train"]
    assert len(train) == 2  # Each step's values, with every key:
    for scalars in train:
        assert {k.removeprefix("train_"): v for k, v in scalars.items() if k.startswith("train_")} == expected
    (valid,) = [line["scalars"] for line in lines if line["phase"] == "valid"]
    assert {k.removeprefix("valid_"): v for k, v in valid.items() if k.startswith("valid_")} == expected


class LogsADict(BoringTask):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.log("several", {"a": 1.0, "b": 2.0})  # Lightning takes a flat dict; mlfab's loggers need one number.
        return super().training_step(batch, batch_idx)


def test_a_value_that_is_no_number_tensor_or_metric_is_refused_with_the_key_and_the_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"self\.log\('several', \.\.\.\) got a dict.*log_dict"):
        trainer(tmp_path).fit(LogsADict(BoringConfig(max_steps=2)))


class LogsAComplex(BoringTask):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.log("phase_angle", np.complex64(1 + 2j))
        return super().training_step(batch, batch_idx)


def test_a_complex_number_is_refused_rather_than_skipped_when_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"self\.log\('phase_angle', \.\.\.\) got a complex64"):
        trainer(tmp_path).fit(LogsAComplex(BoringConfig(max_steps=2)))


class LogsAMetric(BoringTask):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.mean_target = torchmetrics.MeanMetric()
        self.targets: list[Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self.targets.append(batch[1])
        self.mean_target.update(batch[1])
        self.log("mean_target", self.mean_target)
        return super().validation_step(batch, batch_idx)


def test_a_torchmetrics_metric_is_computed_when_it_is_written(tmp_path: Path) -> None:
    task = LogsAMetric(BoringConfig(max_steps=2))
    trainer(tmp_path).fit(task)

    (valid,) = [line["scalars"] for line in json_lines(tmp_path / "run") if line["phase"] == "valid"]
    assert valid["mean_target"] == pytest.approx(float(torch.cat(task.targets).mean()), rel=1e-6)
