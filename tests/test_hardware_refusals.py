"""Hardware settings a machine or a Slurm job cannot honour are refused with an error naming the key and the fix,
never switched or dropped silently: fp16 mixed precision on CPU, GPU indices on CPU, several nodes without the
rendezvous variables (and a Slurm job's shape: tests/test_slurm.py)."""

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import mlfab
from mlfab.errors import TRACEBACK_ENV
from mlfab.run.distributed import resolve_hardware
from mlfab.run.trainer import resolve_precision
from mlfab.testing import BoringConfig, BoringTask


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside any Slurm job or torchrun, on a machine with no GPU, errors without their traceback."""
    for var in list(os.environ):
        if var.startswith(("SLURM_", "TORCHELASTIC_")) or var in ("MLFAB_EXP_DIR", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
            monkeypatch.delenv(var)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def run_as_program(monkeypatch: pytest.MonkeyPatch, *args: str, task: Any = BoringTask) -> int:
    """`BoringTask.launch(BoringConfig())` as `python my_task.py ARGS` runs it; returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["my_task.py", *args])
    with pytest.raises(SystemExit) as info:
        task.launch(BoringConfig())
    assert isinstance(info.value.code, int)
    return info.value.code


def run_dirs(runs: Path) -> list[Path]:
    return [p.parent for p in runs.rglob("config.yaml")] if runs.exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.unit
def test_fp16_mixed_on_cpu_is_refused_naming_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    assert run_as_program(monkeypatch, "precision=16-mixed", "max_steps=1", f"run_dir={runs}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith("error: precision=16-mixed"), err
    assert "bf16-mixed, 32-true" in err and "accelerator=cuda" in err, err
    assert run_dirs(runs) == []  # Refused before the run started: no run directory, no config.yaml saying 16-mixed.


@pytest.mark.unit
def test_precision_is_resolved_for_the_accelerator_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(mlfab.ConfigError, match=r"precision=16-mixed .* accelerator is cpu"):
        resolve_precision("16-mixed")  # accelerator=auto on this CPU machine is the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("16-mixed", "cuda") == "16-mixed"
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"  # accelerator=cpu on a GPU machine: not a GPU's default.
    with pytest.raises(mlfab.ConfigError, match="precision=16-mixed"):
        resolve_precision("16-mixed", "cpu")


@pytest.mark.integration
def test_fp16_true_still_trains_on_cpu(tmp_path: Path) -> None:
    BoringTask.launch(BoringConfig(max_steps=2, exp_dir=str(tmp_path)), argv=["precision=16-true"])
    assert "precision: 16-true" in (tmp_path / "config.yaml").read_text()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert {t.dtype for t in state["state_dict"].values()} == {torch.float16}


# ---------------------------------------------------------------------------------------------------------------------
# GPU indices


@pytest.mark.unit
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_gpu_indices_on_cpu_are_refused_naming_devices(
    accelerator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    args = (f"accelerator={accelerator}", "devices=0,1", "max_steps=1", f"run_dir={runs}")
    assert run_as_program(monkeypatch, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith("error: devices=0,1 picks GPUs by index, but this run trains on the CPU"), err
    assert "devices=2" in err and "accelerator=cuda" in err, err
    assert not runs.exists()
    assert resolve_hardware(accelerator, 2, 1, "auto")["devices"] == 2  # A number of CPU processes is fine.


@pytest.mark.unit
def test_several_nodes_without_the_rendezvous_variables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning would wait at the process group's start for machines that never come."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(mlfab.ConfigError, match=r"num_nodes=2 without MASTER_ADDR, MASTER_PORT, NODE_RANK: run the"):
        resolve_hardware("cpu", 1, 2, "auto")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    assert resolve_hardware("cpu", 1, 2, "auto")["num_nodes"] == 2
