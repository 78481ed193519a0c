"""A logged value that cannot be written: refused at the call when that can be known (a string as a scalar), else
skipped with an error naming the `log_*` call, its key and the step, while training goes on."""

import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration


class BadLazyValue(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        self.log_scalar("broken", lambda: 1 / 0)
        self.log_scalar("fine", state.num_steps)
        self.log_scalar("many", torch.arange(3.0))  # Not one number: no silent mean.
        return super().get_loss(batch, state)


def test_a_lazy_value_that_raises_is_skipped_with_its_key_and_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="mlfab.logs.buffer"):
        BadLazyValue.launch(BoringConfig(max_steps=5, exp_dir=str(tmp_path / "run")), argv=[])
    first = [r for r in caplog.records if "log_scalar('broken', namespace='value')" in r.getMessage()]
    assert first and "could not be written at step 0 and is skipped" in first[0].getMessage()
    assert "ZeroDivisionError" in first[0].getMessage()
    assert len(first) == 2  # Once per key in each phase (training, validation), not once per step.
    scalars = read_scalars(tmp_path / "run" / "tensorboard" / "train")
    assert "value/fine" in scalars and "value/broken" not in scalars  # The rest of the step is written.
    many = [r.getMessage() for r in caplog.records if "log_scalar('many', namespace='value')" in r.getMessage()]
    assert many and "a scalar is one number, got a tensor of shape (3,)" in many[0]
    assert "value/many" not in scalars
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # Training went on to the end.


class StringScalar(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        self.log_scalar("name", "resnet")
        return super().get_loss(batch, state)


def test_a_string_given_to_log_scalar_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(mlfab.TaskDefinitionError, match=r"log_scalar\('name'\) got the string 'resnet'.*log_string"):
        StringScalar.launch(BoringConfig(max_steps=5, exp_dir=str(tmp_path / "run")), argv=[])
