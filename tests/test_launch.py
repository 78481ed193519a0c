"""Launching as a user does: the command line, exit codes, Ctrl-C, the offline example."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # Keep the caller's entries.

SCRIPT = """
import sys, time
import mlfab
from mlfab.testing import BoringConfig, BoringTask

class Crashing(BoringTask):
    def get_loss(self, batch, state):
        if state.num_steps == 3:
            raise RuntimeError("boom at step 3")
        return super().get_loss(batch, state)

class Slow(BoringTask):
    def get_loss(self, batch, state):
        if state.num_steps == 2:
            print("STEP2", flush=True)
        time.sleep(0.05)
        return super().get_loss(batch, state)

if __name__ == "__main__":
    {"crash": Crashing, "slow": Slow}[sys.argv[1]].launch(BoringConfig(), argv=sys.argv[2:])
"""


def run_script(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "tasks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.integration
def test_crash_exits_non_zero_with_traceback(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "crash", f"run_dir={tmp_path / 'runs'}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" in err and "RuntimeError: boom at step 3" in err


@pytest.mark.integration
def test_ctrl_c_stops_at_step_boundary_saves_and_exits_non_zero(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "slow", f"run_dir={tmp_path / 'runs'}", "max_steps=100000")
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "STEP2" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopping after this step" in err
    (exp,) = (tmp_path / "runs" / "slow").iterdir()
    ckpt = exp / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    import torch

    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 3 <= step < 100000


@pytest.mark.slow
def test_offline_example_reaches_accuracy(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.digits", f"run_dir={tmp_path / 'runs'}", "max_steps=300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (exp,) = (tmp_path / "runs" / "digits_classification").iterdir()
    assert f"Run directory: {exp}" in proc.stdout
    accuracy = read_scalars(exp / "tensorboard" / "valid")["value/accuracy"]
    assert accuracy[-1][0] == 300 and accuracy[-1][1] >= 0.95

    # `predict` on the run (the README's command form): each digit's class (it crashed on the raw images).
    predict = [sys.executable, "-m", "examples.digits", "predict", f"--model.config.exp_dir={exp}"]
    proc = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (saved,) = (exp / "predictions").glob("*.pt")
    labels = torch.cat(torch.load(saved, weights_only=False)["predictions"])
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) <= 9 and len(labels) > 100


@pytest.mark.integration
def test_key_value_overrides_and_yaml_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("max_steps: 3\nbatch_size: 4\n")
    BoringTask.launch(
        BoringConfig(), argv=[str(tmp_path / "a.yaml"), "batch_size=2", f"run_dir={tmp_path / 'r'}", "betas=[0.5, 0.6]"]
    )
    (exp,) = (tmp_path / "r" / "boring_task").iterdir()
    config = yaml.safe_load((exp / "config.yaml").read_text())["model"]["config"]
    assert config["batch_size"] == 2 and config["max_steps"] == 3 and config["betas"] == [0.5, 0.6]


@pytest.mark.unit
def test_bad_override_reports_every_problem(tmp_path: Path) -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        BoringTask.launch(BoringConfig(), argv=["bach_size=3", "max_steps=abc", f"run_dir={tmp_path}"])
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "unknown key 'bach_size'; did you mean 'batch_size'?" in message
    assert "key 'max_steps'" in message and "'abc'" in message


@pytest.mark.unit
def test_help_lists_fields_with_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(BoringConfig(), argv=["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.config.batch_size BATCH_SIZE Samples per batch (type: int, default: 8)" in out
    assert "Validate every N seconds of wall-clock time" in out


@pytest.mark.integration
def test_an_evaluation_without_weights_says_it_evaluates_an_untrained_task(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """`test` with no --ckpt_path and no run of checkpoints printed chance-level numbers without a word."""
    BoringTask.launch(BoringConfig(), argv=["test", f"--model.config.run_dir={tmp_path}"])
    err = capfd.readouterr().err
    assert "Note: test evaluates BoringTask as its __init__ built it: no --ckpt_path, and " in err
    exp = tmp_path / "trained"
    BoringTask.launch(BoringConfig(max_steps=2, valid_every_n_steps=None), argv=[f"exp_dir={exp}"])
    capfd.readouterr()
    BoringTask.launch(BoringConfig(), argv=["test", f"--model.config.exp_dir={exp}"])
    assert "Note: test evaluates" not in capfd.readouterr().err
