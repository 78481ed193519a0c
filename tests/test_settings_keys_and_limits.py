"""A mistyped settings key is an error (never ignored); `max_bad_samples_in_a_row` stops at exactly that many, as
`max_nonfinite_steps_in_a_row` does; the non-finite-gradient error reads as English."""

from pathlib import Path

import numpy as np
import pytest
from torch import Tensor

import mlfab
from mlfab.data import BadSamples, Collate
from mlfab.settings import load_settings
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset

# ---------------------------------------------------------------------------------------------------------------------
# Settings: unknown keys.


@pytest.mark.integration
def test_mistyped_directories_key_stops_the_launch_naming_file_key_and_fix(tmp_path: Path) -> None:
    Path("mlfab.yml").write_text(f"directories:\n  runs: {tmp_path / 'wanted'}\n")
    with pytest.raises(mlfab.SettingsError) as info:
        BoringTask.launch(BoringConfig(max_steps=1), argv=[])
    message = str(info.value)
    assert f"The mlfab settings file {Path.cwd() / 'mlfab.yml'} has an unknown key `directories.runs`" in message
    assert "(did you mean `directories.run`?)" in message
    assert "the keys of `directories` are run, data, pretrained_models" in message
    assert list(Path.cwd().iterdir()) == [Path.cwd() / "mlfab.yml"]  # No run went to ./runs.
    assert not (tmp_path / "wanted").exists()


@pytest.mark.unit
def test_mistyped_key_in_user_file_is_an_error_for_every_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", "/env/data")
    rc = Path.cwd().parent / "home" / ".mlfab.yml"
    rc.parent.mkdir(parents=True, exist_ok=True)
    rc.write_text("directories:\n  data: /file/data\n  pretrained_model: /file/models\n")
    with pytest.raises(mlfab.SettingsError, match=r"unknown key `directories.pretrained_model` \(did you mean "):
        mlfab.get_data_dir()  # Not the key that is wrong, but the file is: no directory is read from it.
    with pytest.raises(mlfab.SettingsError, match=str(rc)):
        mlfab.get_run_dir(missing_ok=True)


@pytest.mark.unit
def test_unknown_section_is_an_error_and_mlfab_02_sections_are_accepted() -> None:
    Path("mlfab.yml").write_text("directory:\n  run: /x\n")
    with pytest.raises(mlfab.SettingsError) as info:
        mlfab.get_run_dir(missing_ok=True)
    message = str(info.value)
    assert "has an unknown section `directory` (did you mean `directories`?)" in message
    assert "the sections are directories and, accepted unused from mlfab 0.2, error_handling, logging" in message
    Path("mlfab.yml").write_text("logging:\n  log_level: INFO\ndevice:\n  gpu: 1\ndirectories:\n  run: /r\n")
    assert mlfab.get_run_dir() == Path("/r")
    assert load_settings()["logging"] == {"log_level": "INFO"}


@pytest.mark.integration
def test_a_mistyped_key_inside_a_mlfab_02_section_stops_the_launch(tmp_path: Path) -> None:
    """`default_random_sed: 7` kept 0.2's seed 1337 unseen, where `default_random_seed: 7` is refused with the key to
    set; a section that is not a mapping (`device: false`) was ignored too."""
    for text, said in [
        (
            "experiment:\n  default_random_sed: 7\n",
            "`experiment.default_random_sed` (did you mean "
            "`experiment.default_random_seed`?); the keys of `experiment` are default_random_seed, max_workers, "
            "multiprocessing_start_method",
        ),
        ("device:\n  gpus: false\n", "`device.gpus` (did you mean `device.gpu`?)"),
        ("device: false\n", "has `device: False`; mlfab 0.2's `device` section holds the keys gpu, metal, use_fp64"),
    ]:
        Path("mlfab.yml").write_text(text)
        with pytest.raises(mlfab.SettingsError) as info:
            BoringTask.launch(BoringConfig(max_steps=1), argv=[])
        assert said in str(info.value), text
        assert list(Path.cwd().iterdir()) == [Path.cwd() / "mlfab.yml"]  # No run started.
    Path("mlfab.yml").write_text("device:\n  cpu: false\ntriton:\n  use_triton_if_available: false\nexperiment:\n")
    assert load_settings()["device"] == {"cpu": False}  # Keys 0.2 had whose either value holds; an empty section.


# ---------------------------------------------------------------------------------------------------------------------
# max_bad_samples_in_a_row: "stop when this many in a row fail", like max_nonfinite_steps_in_a_row.


class FailsInARow(RegressionDataset):
    """Samples 3 to 2 + `count` (counted from 1) fail to load, the others load."""

    def __init__(self, in_dim: int, count: int) -> None:
        super().__init__(in_dim)
        self.calls, self.count = 0, count

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if 3 <= self.calls < 3 + self.count:
            raise ValueError(f"bad sample {self.calls}")
        return super().next()


def launch_failing(tmp_path: Path, count: int, limit: int) -> None:
    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> RegressionDataset:
            return FailsInARow(self.config.in_dim, count) if phase == "train" else super().get_dataset(phase)

    Task.launch(BoringConfig(max_steps=2, max_bad_samples_in_a_row=limit, run_dir=str(tmp_path)), argv=[])


@pytest.mark.integration
def test_exactly_max_bad_samples_in_a_row_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(mlfab.DatasetError, match=r"^3 samples in a row from FailsInARow failed to load \(max_bad_"):
        launch_failing(tmp_path / "three", count=3, limit=3)
    launch_failing(tmp_path / "two", count=2, limit=3)  # One fewer: skipped, and the run finishes.


@pytest.mark.unit
def test_bad_samples_and_bad_batches_stop_at_the_limit() -> None:
    bad = BadSamples("Data", max_in_a_row=2)
    bad.failed(ValueError("one"))
    with pytest.raises(mlfab.DatasetError, match="^2 samples in a row from Data failed to load"):
        bad.failed(ValueError("two"))

    def collate(items: list) -> object:
        raise ValueError("ragged")

    collate_fn = Collate(collate, max_bad_in_a_row=2, name="Data")
    assert collate_fn([1]) is None
    with pytest.raises(mlfab.DatasetError, match="^2 batches in a row from Data failed to collate"):
        collate_fn([1])


# ---------------------------------------------------------------------------------------------------------------------
# The non-finite-gradient error.


@pytest.mark.integration
def test_non_finite_gradient_error_reads_as_english(tmp_path: Path) -> None:
    class NaNGradient(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            weight = next(self.parameters())
            # sqrt(|0|) is 0, a finite loss; its gradient is inf * 0 = nan.
            return super().get_loss(batch, state) + (weight - weight.detach()).abs().sqrt().sum()

    config = BoringConfig(max_steps=10, max_nonfinite_steps_in_a_row=2, run_dir=str(tmp_path))
    with pytest.raises(mlfab.NonFiniteError) as info:
        NaNGradient.launch(config, argv=[])
    assert str(info.value).startswith("2 optimizer steps in a row had a non-finite gradient (last at step 1); ")
