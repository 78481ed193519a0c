"""A logged value that cannot be written: refused at the call when that can be known (a string as a scalar), else
skipped with an error naming the `log_*` call, its key and the step, while training goes on."""

import logging
from pathlib import Path

import numpy as np
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
        self.log_scalar("np_many", np.arange(3.0))  # numpy's own error, not mlfab's.
        self.log_scalar("np_one", np.array([2.5]))  # One number, as torch.tensor([2.5]) is: it was skipped.
        self.log_histogram("none", torch.empty(0))  # Nothing to bin: TensorBoard and W&B wrote nothing, silently.
        self.log_audio("silent", torch.empty(0))  # A 0-frame WAV and a blank spectrogram were written.
        self.log_histogram("complex", torch.ones(3, dtype=torch.complex64))  # Binned .real with a ComplexWarning.
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
    assert many and "a scalar is one number, got a Tensor of shape (3,)" in many[0]
    assert "value/many" not in scalars
    np_many = [r.getMessage() for r in caplog.records if "log_scalar('np_many', namespace='value')" in r.getMessage()]
    assert np_many and "a scalar is one number, got a ndarray of shape (3,)" in np_many[0]
    assert {value for _, value in scalars["value/np_one"]} == {2.5}  # At each step written.
    said = [r.getMessage() for r in caplog.records]
    assert any("log_histogram('none', namespace='value') could not be written at step 0" in m for m in said)
    assert any("ValueError(\"log_histogram('none'): no values to bin\")" in m for m in said)
    assert any("ValueError(\"log_histogram('complex'): cannot bin complex values; log their .abs()" in m for m in said)
    assert any("ValueError(\"log_audio('silent'): the clip has no samples (shape (0,))\")" in m for m in said)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # Training went on to the end.


class StringScalar(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        self.log_scalar("name", "resnet")
        return super().get_loss(batch, state)


@pytest.mark.parametrize("rate", [0, -8000, 22050.5, float("nan"), True, "44100"])
def test_a_sample_rate_that_no_clip_can_have_is_refused_at_the_call(tmp_path: Path, rate: object) -> None:
    """It was used only when a logger wrote the clip: `wave.Error` (0, -8000) or W&B's TypeError (a float) stopped
    the run there without naming the key, and 22050.5 went into the WAV header as 22050."""

    class BadRate(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            self.log_audios("clips", torch.zeros(2, 100), sample_rate=rate)  # type: ignore[arg-type]
            return super().get_loss(batch, state)

    with pytest.raises(ValueError) as info:
        BadRate.launch(BoringConfig(max_steps=2, exp_dir=str(tmp_path / "run")), argv=[])
    assert str(info.value) == (
        f"log_audios('clips'): sample_rate must be a whole number of samples per second >= 1, got {rate!r}"
    )


def test_a_string_given_to_log_scalar_is_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(mlfab.TaskDefinitionError, match=r"log_scalar\('name'\) got the string 'resnet'.*log_string"):
        StringScalar.launch(BoringConfig(max_steps=5, exp_dir=str(tmp_path / "run")), argv=[])


class NanImageTask(BoringTask):
    """Logs a NaN image at every step; at its second step it builds another task, as a callback loading a
    checkpoint would."""

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        self.log_image("nan_image", np.full((2, 2), np.nan, np.float32))
        if state.num_steps == 1:
            BoringTask(BoringConfig())
        return super().get_loss(batch, state)


def test_each_run_says_the_media_warnings_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Said once per key per process, a second run in a notebook or sweep said nothing about its own NaN image; a
    task built during a run must not make it say them again."""
    with caplog.at_level("WARNING", logger="mlfab.logs.media"):
        for run in ("first", "second"):
            config = BoringConfig(exp_dir=str(tmp_path / run), max_steps=3, valid_every_n_steps=None)
            NanImageTask.launch(config, argv=[])
    said = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "mlfab.logs.media"]
    assert said == ["log_image('nan_image')"] * 2
