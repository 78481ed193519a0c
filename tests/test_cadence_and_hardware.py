"""Wall-clock validation cadences, and how the hardware keys become Trainer arguments."""

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import mlfab
from mlfab.errors import ConfigError
from mlfab.run.distributed import resolve_hardware
from mlfab.testing import BoringConfig, BoringTask, read_scalars


class Slow(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        if state.phase == "train":
            time.sleep(0.02)
        return super().get_loss(batch, state)


def valid_steps(tmp_path: Path, name: str = "slow") -> list[int]:
    (exp,) = (tmp_path / name).iterdir()
    return [step for step, _ in read_scalars(exp / "tensorboard" / "valid")["loss/loss"]]


@pytest.mark.integration
def test_validation_every_n_seconds(tmp_path: Path) -> None:
    Slow.launch(
        BoringConfig(max_steps=40, valid_every_n_steps=None, valid_every_n_seconds=0.2, run_dir=str(tmp_path)), argv=[]
    )
    steps = valid_steps(tmp_path)
    # After the first step, then about every 10 steps (0.2 s at 0.02 s a step), not on a fixed step grid; and the
    # final model.
    steps, final = steps[:-1], steps[-1]
    assert steps[0] == 1 and 3 <= len(steps) <= 6 and final == 40
    assert all(2 <= b - a <= 15 for a, b in zip(steps, steps[1:], strict=False))  # Steps slow down on a busy machine.


@pytest.mark.integration
def test_first_validation_after_n_seconds(tmp_path: Path) -> None:
    config = BoringConfig(max_steps=150, valid_every_n_steps=1000, valid_first_n_seconds=2.0, run_dir=str(tmp_path))
    Slow.launch(config, argv=[])
    steps = valid_steps(tmp_path)
    # 2 s into the run (its clock starts with the task, so setup counts: 0.3 s was reached before the first step on
    # a busy CI machine), at 0.02 s a step at most 100 steps: not after the first step; then the final model.
    assert len(steps) == 2 and 2 <= steps[0] <= 100 and steps[1] == 150


@pytest.mark.integration
def test_steps_and_seconds_together(tmp_path: Path) -> None:
    Slow.launch(
        BoringConfig(max_steps=30, valid_every_n_steps=25, valid_every_n_seconds=0.25, run_dir=str(tmp_path)), argv=[]
    )
    steps = valid_steps(tmp_path)
    assert 25 in steps and len(steps) >= 3  # The step cadence and the time cadence both fire.


@pytest.mark.unit
def test_hardware_auto_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # For num_nodes=2 below.
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test checks the CPU defaults")
    assert resolve_hardware("auto", "auto", 1, "auto") == {
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
    }
    assert resolve_hardware("cpu", 2, 1, "auto")["strategy"] == "ddp"
    assert resolve_hardware("cpu", 1, 2, "auto")["strategy"] == "ddp"
    assert resolve_hardware("cpu", 2, 1, "fsdp")["strategy"] == "fsdp"


@pytest.mark.unit
def test_mps_trains_on_one_device_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with caplog.at_level("WARNING"):
        hw = resolve_hardware("auto", 4, 1, "auto")
    assert hw == {"accelerator": "mps", "devices": 1, "num_nodes": 1, "strategy": "auto"}
    assert "MPS supports one device; training on one instead of devices=4" in caplog.text


@pytest.mark.unit
def test_torchrun_environment_sets_devices_and_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    hw = resolve_hardware("cpu", "auto", 1, "auto")
    assert (hw["devices"], hw["num_nodes"], hw["strategy"]) == (4, 2, "ddp")
    assert resolve_hardware("cpu", 4, 2, "auto")["devices"] == 4  # Given and matching: kept.


@pytest.mark.unit
def test_devices_or_nodes_other_than_torchruns_are_refused_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """They were replaced by torchrun's shape without a word, while config.yaml recorded the values given."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as info:
        resolve_hardware("cpu", 4, 2, "auto")
    message = str(info.value)
    assert "devices=4 and num_nodes=2 disagree with torchrun" in message, message
    assert "started 2 process(es) per node on 1 node(s)" in message and "--nproc_per_node" in message, message
    with pytest.raises(ConfigError, match="num_nodes=3 disagrees with torchrun"):
        resolve_hardware("cpu", "auto", 3, "auto")


@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by hand on a GPU machine)")
def test_single_gpu_bf16(tmp_path: Path) -> None:
    hw = resolve_hardware("auto", "auto", 1, "auto")
    assert hw["accelerator"] == "cuda"
    from mlfab.run.trainer import resolve_precision

    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto") == expected
    devices: list[str] = []
    pinned: list[bool] = []

    class OnGpu(BoringTask):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            pinned.append(batch[0].is_pinned())  # Pinned host memory: Lightning then copies with non_blocking.
            return super().on_before_batch_transfer(batch, dataloader_idx)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            devices.append(batch[0].device.type)
            return super().get_loss(batch, state)

    OnGpu.launch(BoringConfig(max_steps=20, run_dir=str(tmp_path)), argv=[])
    assert set(devices) == {"cuda"}
    assert pinned and all(pinned)
    valid = read_scalars(next((tmp_path / "on_gpu").iterdir()) / "tensorboard" / "valid")["loss/loss"]
    assert valid[-1][1] < valid[0][1]


@pytest.mark.integration
def test_wall_clock_cadences_count_training_time_across_relaunches(tmp_path: Path) -> None:
    """A run relaunched every 5 steps (0.1 s of training, less than either interval) still validates and saves on
    time: the clocks continue from the checkpoint instead of restarting at every launch."""
    exp = tmp_path / "run"
    for max_steps in range(5, 45, 5):
        config = BoringConfig(
            max_steps=max_steps,
            valid_every_n_steps=None,
            valid_every_n_seconds=0.2,
            save_every_n_seconds=0.2,
            keep_last_n_checkpoints=10,
            exp_dir=str(exp),
        )
        Slow.launch(config, argv=[])
    steps = [step for step, _ in read_scalars(exp / "tensorboard" / "valid")["loss/loss"]]
    # Without the carried clocks: a validation at step 1 only, and no timed checkpoint at all.
    assert steps[0] == 1 and len(steps) >= 3 and len(set(steps)) == len(steps), steps
    timed = sorted((exp / "checkpoints").glob("time_step_*.ckpt"))
    assert len(timed) >= 2, [p.name for p in timed]


@pytest.mark.integration
def test_accumulation_given_as_a_trainer_flag_keeps_the_validation_cadence_in_optimizer_steps(tmp_path: Path) -> None:
    """`--trainer.accumulate_grad_batches 2` accumulates as `batches_per_step=2` does; the validation cadence (in
    optimizer steps) follows it instead of coming twice as often."""
    validated: list[int] = []

    class Recording(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            if state.phase == "valid":
                validated.append(state.num_steps)
            return super().get_loss(batch, state)

    common = ["fit", "--model.config.valid_every_n_steps=4", "--model.config.max_steps=8"]
    common += ["--model.config.valid_batches=1", "--model.config.valid_every_n_seconds=null"]
    seen = []
    for name, accumulation in (
        ("flag", "--trainer.accumulate_grad_batches=2"),
        ("key", "--model.config.batches_per_step=2"),
    ):
        validated.clear()
        Recording.launch(BoringConfig(), argv=[*common, accumulation, f"--model.config.exp_dir={tmp_path / name}"])
        seen.append(list(validated))
    assert seen[0] == seen[1] == [1, 4, 8]
