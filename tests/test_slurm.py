"""Slurm: the batch script, submitting with `sbatch`, requeueing with `scontrol`, and (end to end) a run that is
told by SIGUSR1 that its time is up, checkpoints, requeues itself and resumes.

Fake `sbatch`, `srun` and `scontrol` executables on PATH record how they are called.
"""

import os
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import mlfab
import mlfab.run.trainer
from mlfab.config import SlurmConfig
from mlfab.errors import SlurmError
from mlfab.run import invocation, slurm
from mlfab.run.distributed import resolve_hardware
from mlfab.testing import BoringConfig, BoringTask, read_scalars
from tests.test_loggers_wandb_json import read_lines
from tests.test_resume_validation import GlobalDraws

ROOT = Path(__file__).resolve().parents[1]

FAKES = {
    # Prints a job id the way `sbatch --parsable` does (`<id>;<cluster>`), or fails like a refused submission.
    "sbatch": """
echo "sbatch $*" >> "$FAKE_SLURM_LOG"
if [ -n "$FAKE_SBATCH_FAIL" ]; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
echo "1234;cluster"
""",
    # Starts one task with the variables srun sets for it.
    "srun": """
echo "srun $*" >> "$FAKE_SLURM_LOG"
export SLURM_NTASKS=1 SLURM_NNODES=1 SLURM_NTASKS_PER_NODE=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0
export SLURM_STEP_ID=0
exec "$@"
""",
    "scontrol": """
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1" = show ]; then echo node1; echo node2; fi
exit "${FAKE_SCONTROL_STATUS:-0}"
""",
}

# Variables of a Slurm task started by srun in batch job 1234.
TASK_ENV = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NAME": "test",
    "SLURM_JOB_NODELIST": "node1",
    "SLURM_NTASKS": "1",
    "SLURM_NNODES": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_STEP_ID": "0",
}


@pytest.fixture(autouse=True)
def no_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start outside any Slurm job (even when pytest itself runs in one)."""
    variables = ("MLFAB_EXP_DIR", "MLFAB_SLURM_EXP_DIR", "LOCAL_WORLD_SIZE", "WORLD_SIZE")
    for var in list(os.environ):
        if var.startswith(("SLURM_", "TORCHELASTIC_")) or var in variables:
            monkeypatch.delenv(var)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the fake Slurm commands first on PATH; returns the file they append their command lines to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body.lstrip())
        path.chmod(0o755)
    calls = tmp_path / "slurm_calls.log"
    calls.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(calls))
    return calls


def in_task(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    for key, value in {**TASK_ENV, **extra}.items():
        monkeypatch.setenv(key, value)


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ---------------------------------------------------------------------------------------------------------------------
# The batch script and submitting it.


@pytest.mark.unit
def test_submit_writes_the_script_and_records_the_job(
    fake_slurm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp_dir, work = tmp_path / "runs" / "my_task" / "run_3", tmp_path / "work"
    config = SlurmConfig(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=6,
        mem="64G",
        time="0-02:00:00",
        partition="gpu",
        account="lab",
        extra_sbatch_lines=["--qos=high", "#SBATCH --constraint=a100"],
    )
    command = ["-m", "examples.mnist", "fit", "--model.config.max_steps=5"]
    assert slurm.submit(config, exp_dir=exp_dir, command=command, workdir=work) == "1234"

    script_path = exp_dir / "slurm" / "job.sbatch"
    script = script_path.read_text()
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=my_task-run_3",
        f"#SBATCH --output={exp_dir}/slurm/%j.out",
        f"#SBATCH --error={exp_dir}/slurm/%j.err",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=64G",
        "#SBATCH --time=0-02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
    ]
    lines = script.splitlines()
    assert f"cd {work}" in lines
    assert lines[-1] == (
        f"srun {sys.executable} -m examples.mnist fit --model.config.max_steps=5 --model.config.exp_dir={exp_dir}"
    )
    assert "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))" in lines
    assert fake_slurm.read_text().splitlines() == [f"sbatch --parsable {script_path}"]
    assert (exp_dir / "slurm" / "jobs.txt").read_text() == "1234\n"
    out = capsys.readouterr().out
    assert "Submitted Slurm job 1234" in out and f"{exp_dir}/slurm/1234.out" in out

    slurm.submit(config, exp_dir=exp_dir, command=command, workdir=work)
    assert (exp_dir / "slurm" / "jobs.txt").read_text() == "1234\n1234\n"


@pytest.mark.unit
def test_defaults_leave_cluster_defaults_alone(tmp_path: Path) -> None:
    config = SlurmConfig(gpus_per_node=0, python="/opt/py/bin/python")
    lines = sbatch_lines(slurm.sbatch_script(config, exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path))
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --time=1-00:00:00" in lines
    assert not [
        line
        for line in lines
        if line.startswith(("#SBATCH --gpus", "#SBATCH --mem", "#SBATCH --partition", "#SBATCH --account"))
    ]
    script = slurm.sbatch_script(config, exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path)
    assert script.splitlines()[-1] == f"srun /opt/py/bin/python t.py --model.config.exp_dir={tmp_path / 'run'}"


@pytest.mark.unit
def test_extra_sbatch_options_come_before_any_verbatim_line(tmp_path: Path) -> None:
    """sbatch stops reading `#SBATCH` lines at the first command: an option given after a verbatim line (`module
    load ...`) would be ignored without a word."""
    config = SlurmConfig(extra_sbatch_lines=["module load cuda", "--qos=high", "#SBATCH --constraint=a100"])
    lines = slurm.sbatch_script(config, exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path).splitlines()
    first_command = next(i for i, line in enumerate(lines) if i > 0 and line and not line.startswith("#"))
    assert lines[first_command] == "module load cuda"
    assert {"#SBATCH --qos=high", "#SBATCH --constraint=a100"} <= set(lines[:first_command])
    assert SlurmConfig().extra_sbatch_lines == [] and SlurmConfig().extra_sbatch_lines is not config.extra_sbatch_lines


@pytest.mark.unit
def test_paths_and_arguments_are_quoted(tmp_path: Path) -> None:
    exp_dir, work = tmp_path / "my runs" / "run_0", tmp_path / "it's here"
    command = ["train.py", "fit", "--model.config.name=a b", "--model.config.tags=[x, y]"]
    script = slurm.sbatch_script(SlurmConfig(), exp_dir=exp_dir, command=command, workdir=work)
    lines = script.splitlines()
    assert shlex.split(lines[-1]) == ["srun", sys.executable, *command, f"--model.config.exp_dir={exp_dir}"]
    assert shlex.split(next(line for line in lines if line.startswith("cd "))) == ["cd", str(work)]
    assert f'#SBATCH --output="{exp_dir}/slurm/%j.out"' in lines
    with pytest.raises(SlurmError, match="one option per entry"):
        slurm.sbatch_script(SlurmConfig(extra_sbatch_lines=["--qos=a\n--x"]), exp_dir=exp_dir, command=[], workdir=work)
    with pytest.raises(SlurmError, match="slurm.nodes"):
        slurm.sbatch_script(SlurmConfig(nodes=0), exp_dir=exp_dir, command=[], workdir=work)


@pytest.mark.integration
def test_the_script_runs_the_command_in_the_run_directory(fake_slurm: Path, tmp_path: Path) -> None:
    """What Slurm does with the script: bash runs it with the job's variables; srun starts the task."""
    exp_dir, work = tmp_path / "run", tmp_path / "job_work"
    work.mkdir()
    probe = (
        "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), os.environ['MASTER_ADDR'], "
        "os.environ['MASTER_PORT'], os.environ.get('MLFAB_EXP_DIR'), os.environ['SLURM_PROCID'], "
        "os.environ.get('MLFAB_SLURM_EXP_DIR')]))"
    )
    slurm.submit(SlurmConfig(), exp_dir=exp_dir, command=["-c", probe, "x=1"], workdir=work)
    env = {**os.environ, "SLURM_JOB_ID": "54321", "SLURM_JOB_NODELIST": "node[1-2]", "MLFAB_EXP_DIR": "/elsewhere"}
    proc = subprocess.run(
        ["bash", str(exp_dir / "slurm" / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    import json

    argv, cwd, addr, port, exp_env, rank, job_exp_dir = json.loads(proc.stdout.splitlines()[-1])
    assert argv == ["x=1", f"--model.config.exp_dir={exp_dir}"]
    assert (cwd, addr, port, exp_env, rank) == (str(work), "node1", str(10000 + 54321 % 20000), None, "0")
    assert job_exp_dir == str(exp_dir)  # For a launch that does not read the command line (argv, use_cli=False).
    calls = fake_slurm.read_text().splitlines()
    assert "scontrol show hostnames node[1-2]" in calls
    assert any(c.startswith(f"srun {sys.executable} -c ") for c in calls)


@pytest.mark.unit
@pytest.mark.parametrize("argv", [[], ["fit"]])
def test_an_unknown_launcher_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    from mlfab.testing import BoringConfig, BoringTask

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # A login node.
    with pytest.raises(mlfab.ConfigError, match=r"Unknown launcher 'slrum': use None"):
        BoringTask.launch(BoringConfig(run_dir=str(tmp_path)), launcher="slrum", argv=argv)
    assert not (tmp_path / "boring_task").exists()  # Nothing started.


@pytest.mark.integration
@pytest.mark.parametrize("form", ["short", "fit"])
def test_both_command_line_forms_submit_the_same_job(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    from mlfab.testing import BoringConfig, BoringTask

    (tmp_path / "train.py").write_text("")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "train.py")])  # As `python train.py ...` started it.
    argv = ["max_steps=3", "betas=[0.5, 0.6]"]
    if form == "fit":
        argv = ["fit", "--model.config.max_steps=3", "--model.config.betas=[0.5, 0.6]"]
    BoringTask.launch(BoringConfig(run_dir=str(tmp_path)), launcher="slurm", argv=argv)
    exp_dir = tmp_path / "boring_task" / "run_0"
    srun = shlex.split((exp_dir / "slurm" / "job.sbatch").read_text().splitlines()[-1])
    fit_args = ["fit", "--model.config.max_steps=3", "--model.config.betas=[0.5, 0.6]"]
    assert srun[-4:] == [*fit_args, f"--model.config.exp_dir={exp_dir}"]
    assert not (exp_dir / "checkpoints").exists()  # Nothing trained on the login node.


@pytest.mark.unit
def test_missing_sbatch_says_where_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match=r"sbatch not found: launcher='slurm' needs a Slurm login node"):
        slurm.submit(SlurmConfig(), exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path)


@pytest.mark.unit
def test_refused_submission_shows_sbatch_error(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    with pytest.raises(mlfab.MlfabError, match=r"(?s)status 1.*invalid partition specified: nope.*slurm.partition"):
        slurm.submit(SlurmConfig(partition="nope"), exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path)
    assert not (tmp_path / "run" / "slurm" / "jobs.txt").exists()


@pytest.mark.unit
def test_current_command_reruns_the_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("__main__")
    module.__spec__ = types.SimpleNamespace(name="examples.mnist.__main__")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", module)
    assert invocation.current_command(["a=1"]) == ["-m", "examples.mnist", "a=1"]
    module.__spec__ = None
    (tmp_path / "train.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "a=1"])
    assert invocation.current_command(["a=1"]) == [str(tmp_path / "train.py"), "a=1"]
    monkeypatch.setattr(sys, "argv", ["-c"])
    with pytest.raises(SlurmError, match="python my_script.py"):
        invocation.current_command([])


# ---------------------------------------------------------------------------------------------------------------------
# Inside the job.


@pytest.mark.unit
def test_job_detection_and_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not slurm.in_slurm_job() and slurm.job_id() is None and slurm.hardware() is None
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert not slurm.in_slurm_job()  # The batch shell, or an allocation: no task started by srun.
    assert slurm.job_id() == "1234"
    in_task(monkeypatch, SLURM_JOB_NAME="interactive")
    assert not slurm.in_slurm_job()  # `srun --job-name=interactive --pty bash`: Lightning ignores it too.
    in_task(monkeypatch, SLURM_NTASKS="8", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="4")
    assert slurm.in_slurm_job()
    assert slurm.hardware() == {"devices": 4, "num_nodes": 2}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm.job_id() == "1200_7"


@pytest.mark.unit
def test_arguments_given_to_launch_get_the_jobs_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's command line holds its run directory, which a launch given its arguments (`argv`, `use_cli`) does
    not read: they get it from the batch script's `MLFAB_SLURM_EXP_DIR`, in the form they are written in."""
    exp_dir = str(tmp_path / "my runs" / "run_0")
    monkeypatch.setenv("MLFAB_SLURM_EXP_DIR", exp_dir)
    assert slurm.job_arguments(["max_steps=3"], "slurm") == ["max_steps=3"]  # The batch shell, not a task of srun.
    in_task(monkeypatch)
    assert slurm.job_arguments([], "slurm") == [f"exp_dir={exp_dir}"]
    assert slurm.job_arguments(["max_steps=3"], "slurm") == ["max_steps=3", f"exp_dir={exp_dir}"]
    fit = ["fit", "--model.config.max_steps=3"]
    assert slurm.job_arguments(fit, "slurm") == [*fit, f"--model.config.exp_dir={exp_dir}"]
    assert slurm.job_arguments(fit, None) == fit  # Another launch in the job (not the one that submitted it).
    monkeypatch.delenv("MLFAB_SLURM_EXP_DIR")
    assert slurm.job_arguments(fit, "slurm") == fit  # A job mlfab did not submit.


@pytest.mark.unit
def test_requeue_on_rank_zero_only(
    fake_slurm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_task(monkeypatch)
    assert slurm.requeue(1) is False
    assert fake_slurm.read_text() == ""
    assert slurm.requeue(0) is True
    assert fake_slurm.read_text().splitlines() == ["scontrol requeue 1234"]
    assert "Requeueing Slurm job 1234" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    slurm.requeue(0)
    assert fake_slurm.read_text().splitlines()[-1] == "scontrol requeue 1200_7"


@pytest.mark.unit
def test_failed_requeue_warns_and_does_not_raise(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    in_task(monkeypatch)
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert slurm.requeue(0) is False
    assert "exited with status 1" in caplog.text and "same exp_dir" in caplog.text
    caplog.clear()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm.requeue(0) is False
    assert "Requeueing Slurm job 1234 failed" in caplog.text


@pytest.mark.unit
def test_after_signal_checkpoint(fake_slurm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert slurm.after_signal_checkpoint(0) is False  # Not in a Slurm job: save and go on.
    in_task(monkeypatch)
    assert slurm.after_signal_checkpoint(1) is True
    assert fake_slurm.read_text() == ""
    assert slurm.after_signal_checkpoint(0) is True
    assert fake_slurm.read_text().splitlines() == ["scontrol requeue 1234"]
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert slurm.after_signal_checkpoint(0) is False  # The requeue failed: keep training.


@pytest.mark.unit
def test_cluster_environment_turns_off_lightnings_sigusr1_handler(
    fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.environments import SLURMEnvironment

    assert slurm.cluster_environment() is None
    in_task(monkeypatch)
    env = slurm.cluster_environment()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False

    def sigusr1_handler(plugins: list) -> object:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            plugins=plugins,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
        connector = trainer._signal_connector
        connector.register_signal_handlers()
        try:
            return signal.getsignal(signal.SIGUSR1)
        finally:
            connector.teardown()

    before = signal.getsignal(signal.SIGUSR1)
    assert sigusr1_handler([]) is not before  # Lightning's own Slurm environment installs its handler...
    assert sigusr1_handler([env]) is before  # ...and the one mlfab passes does not.
    assert signal.getsignal(signal.SIGUSR1) is before

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun inside Slurm: Lightning's pick stays.
    assert slurm.cluster_environment() is None


# ---------------------------------------------------------------------------------------------------------------------
# End to end: needs `launch` and `GracefulStop` to use this module.

TASK = """
import os, signal, sys
from mlfab.testing import BoringConfig, BoringTask, read_scalars

class Interrupted(BoringTask):
    def get_loss(self, batch, state):
        stop = os.environ.get("STOP_AT")
        if state.phase == "train" and stop and state.num_steps == int(stop):
            os.kill(os.getpid(), signal.SIGUSR1)  # What Slurm sends signal_seconds before the time limit.
            if os.environ.get("ALSO_TERM"):  # A step longer than signal_seconds: the time limit's SIGTERM too.
                os.kill(os.getpid(), signal.SIGTERM)
        return super().get_loss(batch, state)

    def get_dataset(self, phase):
        if os.environ.get("SIGNAL_EARLY"):  # Before training: a time limit barely over signal_seconds, a slow start.
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().get_dataset(phase)

if __name__ == "__main__":
    Interrupted.launch(BoringConfig(), launcher=os.environ.get("LAUNCHER"), argv=sys.argv[1:])
"""

COMMON = ["max_steps=12", "valid_every_n_steps=null", "save_every_n_seconds=null"]


def run_task(tmp_path: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "task.py").write_text(TASK)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(command, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigusr1_in_a_slurm_job_checkpoints_requeues_and_resumes(fake_slurm: Path, tmp_path: Path) -> None:
    exp_dir = tmp_path / "run"
    python = [sys.executable, "task.py", *COMMON, f"exp_dir={exp_dir}"]
    first = run_task(tmp_path, python, **TASK_ENV, STOP_AT="5")
    assert first.returncode == 0, first.stderr[-3000:]  # Requeued (the fake scontrol sends no SIGTERM): done.
    assert "scontrol requeue 1234" in fake_slurm.read_text().splitlines()
    saved = sorted((exp_dir / "checkpoints").glob("signal_step_*.ckpt"))
    assert [saved_step(p) for p in saved] == [6]  # Saved at the step boundary after the signal...
    assert saved_step(exp_dir / "checkpoints" / "last.ckpt") == 6  # ...and training stopped there.
    assert "Requeueing Slurm job 1234" in first.stderr

    second = run_task(tmp_path, python, **TASK_ENV, SLURM_RESTART_COUNT="1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout
    assert saved_step(exp_dir / "checkpoints" / "last.ckpt") == 12
    assert fake_slurm.read_text().splitlines().count("scontrol requeue 1234") == 1


@pytest.mark.slow
def test_sigusr1_before_training_starts_checkpoints_and_requeues_at_the_first_step(
    fake_slurm: Path, tmp_path: Path
) -> None:
    """Python's default for SIGUSR1 killed the job (exit -10): no checkpoint, no requeue."""
    exp_dir, first = job_signalled(tmp_path, SIGNAL_EARLY="1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "scontrol requeue 1234" in fake_slurm.read_text().splitlines()
    assert [saved_step(p) for p in (exp_dir / "checkpoints").glob("signal_step_*.ckpt")] == [1]


def job_signalled(tmp_path: Path, **env: str) -> tuple[Path, subprocess.CompletedProcess]:
    """The task run as a Slurm job (12 steps; `STOP_AT`: the step SIGUSR1 comes in, `ALSO_TERM`: SIGTERM too)."""
    exp_dir = tmp_path / "run"
    return exp_dir, run_task(tmp_path, [sys.executable, "task.py", *COMMON, f"exp_dir={exp_dir}"], **TASK_ENV, **env)


def valid_steps(exp_dir: Path) -> list[int]:
    return [step for step, _ in read_scalars(exp_dir / "tensorboard" / "valid")["loss/loss"]]


@pytest.mark.slow
def test_sigusr1_in_the_last_step_neither_requeues_nor_skips_the_final_validation(
    fake_slurm: Path, tmp_path: Path
) -> None:
    """The finished job was requeued (and its relaunch trained and validated nothing), and the signal's stop skipped
    the final validation."""
    exp_dir, done = job_signalled(tmp_path, STOP_AT="11")  # In the 12th (last) step.
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scontrol requeue" not in fake_slurm.read_text()
    assert "this step ends training, so the job is not requeued" in done.stderr
    assert valid_steps(exp_dir) == [1, 12]


@pytest.mark.slow
def test_sigusr1_and_sigterm_in_one_step_still_requeue_the_job(fake_slurm: Path, tmp_path: Path) -> None:
    """SIGTERM took precedence: the job stopped without the requeue the SIGUSR1 asked for."""
    exp_dir, first = job_signalled(tmp_path, STOP_AT="5", ALSO_TERM="1")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "scontrol requeue 1234" in fake_slurm.read_text().splitlines()
    assert saved_step(exp_dir / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_a_stop_in_the_last_step_leaves_the_final_validation_to_the_relaunch(fake_slurm: Path, tmp_path: Path) -> None:
    """The time limit's SIGTERM in the last step: the checkpoint first, no validation, and a hint to relaunch; the
    relaunch (the same command) validates the final model and ends with status 0; a third launch does nothing."""
    exp_dir, done = job_signalled(tmp_path, STOP_AT="11", ALSO_TERM="1")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "scontrol requeue" not in fake_slurm.read_text()
    last = exp_dir / "checkpoints" / "last.ckpt"
    assert (
        "The final model is not validated yet: the signal came in the last step, and the checkpoint comes first. "
        f"Relaunch into this run (exp_dir={exp_dir}) to run that validation: it resumes from {last}, validates"
        in done.stderr
    )
    assert f"  stopped by SIGTERM: to go on from it, relaunch into this run (exp_dir={exp_dir}," in done.stdout
    assert valid_steps(exp_dir) == [1]
    for _ in range(2):
        again = job_signalled(tmp_path)[1]
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Resuming from" in again.stdout and "Finished at step 12/12" in again.stdout
        assert valid_steps(exp_dir) == [1, 12]  # Validated once, by the first relaunch.
        assert saved_step(last) == 12


class GlobalDrawsEverywhere(BoringTask):
    """Training and validation samples drawn from numpy's global generator in the main process, so a validation's
    values depend on the weights and on the random state it starts from; SIGTERM in step `sigterm_at`."""

    sigterm_at: int | None = None

    def set_loggers(self) -> None:
        self.add_logger(mlfab.TensorboardLogger(self.exp_dir), mlfab.JsonLogger(self.exp_dir))

    def get_dataset(self, phase: mlfab.Phase) -> GlobalDraws:
        return GlobalDraws()

    def get_loss(self, batch: Any, state: mlfab.State) -> torch.Tensor:
        if state.phase == "train" and state.num_steps == GlobalDrawsEverywhere.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().get_loss(batch, state)


def launch_steps(exp_dir: Path, max_steps: int = 12, sigterm_at: int | None = None) -> None:
    GlobalDrawsEverywhere.sigterm_at = sigterm_at
    config = BoringConfig(max_steps=max_steps, valid_every_n_steps=5, save_every_n_steps=6, exp_dir=str(exp_dir))
    GlobalDrawsEverywhere.launch(config, argv=[])


def validations(exp_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss/loss) of every validation written, from log.jsonl and from TensorBoard's event file."""
    lines = read_lines(exp_dir / "json" / "log.jsonl")
    return {
        "json": [(x["step"], x["scalars"]["loss/loss"]) for x in lines if x["phase"] == "valid"],
        "tensorboard": read_scalars(exp_dir / "tensorboard" / "valid")["loss/loss"],
    }


@pytest.mark.integration
def test_the_relaunch_after_a_stop_in_the_last_step_validates_as_the_uninterrupted_run_did(tmp_path: Path) -> None:
    """Written once, at max_steps, with the uninterrupted run's values: the same evaluation weights (schedule-free
    AdamW's) and the same random state. Neither that run's relaunch nor a relaunch of a run that ended normally
    writes a validation again, and both leave the run to train on exactly (a relaunch with a higher max_steps)."""
    launch_steps(tmp_path / "whole")
    whole = validations(tmp_path / "whole")
    assert [s for s, _ in whole["json"]] == [1, 5, 10, 12]
    with pytest.raises(SystemExit) as info:
        launch_steps(tmp_path / "cut", sigterm_at=11)  # The 12th step, the last.
    assert info.value.code == 128 + signal.SIGTERM
    assert [s for s, _ in validations(tmp_path / "cut")["json"]] == [1, 5, 10]
    launch_steps(tmp_path / "cut")  # Returns (exit status 0), where the signal raised SystemExit.
    cut = validations(tmp_path / "cut")
    assert cut == whole
    trained = [x for x in read_lines(tmp_path / "cut" / "json" / "log.jsonl") if x["phase"] == "train"]
    assert max(x["step"] for x in trained) == 11  # The relaunch validated and trained nothing.
    for exp_dir in (tmp_path / "cut", tmp_path / "whole"):
        launch_steps(exp_dir)
        assert validations(exp_dir) == whole
        launch_steps(exp_dir, max_steps=16)
    cut, whole = validations(tmp_path / "cut"), validations(tmp_path / "whole")
    assert [s for s, _ in cut["json"]] == [1, 5, 10, 12, 15, 16] and cut == whole
    train = [read_scalars(tmp_path / name / "tensorboard" / "train")["loss/loss"] for name in ("cut", "whole")]
    assert train[0][-1][0] == 15 and train[0] == train[1]


# A script that gives `launch` its arguments itself, in each way; the job's command line (with the run directory)
# is not read there.
OWN_ARGUMENTS = """
import os
from mlfab.testing import BoringConfig
from task import Interrupted

COMMON = {common!r}
if __name__ == "__main__":
    config, form = BoringConfig(run_dir=os.environ["RUNS"]), os.environ["FORM"]
    if form == "use_cli=False":  # mlfab 0.2's style: every setting in the script.
        config = BoringConfig(
            run_dir=os.environ["RUNS"], max_steps=12, valid_every_n_steps=None, save_every_n_seconds=None
        )
        Interrupted.launch(config, launcher="slurm", use_cli=False)
    elif form == "argv":
        Interrupted.launch(config, launcher="slurm", argv=COMMON)
    else:
        Interrupted.launch(config, launcher="slurm", argv=["fit", *("--model.config." + a for a in COMMON)])
"""


@pytest.mark.slow
@pytest.mark.parametrize("form", ["command line", "use_cli=False", "argv", "argv fit"])
def test_launcher_slurm_submits_and_the_job_requeues_and_resumes(fake_slurm: Path, tmp_path: Path, form: str) -> None:
    """In the submitted run directory, with the script's settings, whether `launch` reads the command line or is
    given its arguments (`argv`, `use_cli=False`)."""
    runs = tmp_path / "runs"
    if form == "command line":
        submitted = run_task(tmp_path, [sys.executable, "task.py", *COMMON, f"run_dir={runs}"], LAUNCHER="slurm")
    else:
        (tmp_path / "own.py").write_text(OWN_ARGUMENTS.format(common=COMMON))
        submitted = run_task(tmp_path, [sys.executable, "own.py"], RUNS=str(runs), FORM=form)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "Submitted Slurm job 1234" in submitted.stdout
    exp_dir = runs / "interrupted" / "run_0"
    script = exp_dir / "slurm" / "job.sbatch"
    assert fake_slurm.read_text().splitlines() == [f"sbatch --parsable {script}"]
    assert not (exp_dir / "checkpoints").exists()  # Nothing trained on the login node.

    # Slurm starts the job; SIGUSR1 comes at step 5; after the requeue, Slurm starts the same script again.
    job = {
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "interrupted-run_0",
        "SLURM_JOB_NODELIST": "node1",
        "LAUNCHER": "slurm",
        "RUNS": str(runs),
        "FORM": form,
    }
    first = run_task(tmp_path, ["bash", str(script)], **job, STOP_AT="5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"Run directory: {exp_dir}\n" in first.stdout
    assert "scontrol requeue 1234" in fake_slurm.read_text().splitlines(), first.stderr[-3000:]
    assert saved_step(exp_dir / "checkpoints" / "last.ckpt") == 6
    second = run_task(tmp_path, ["bash", str(script)], **job, SLURM_RESTART_COUNT="1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {exp_dir / 'checkpoints'}" in second.stdout
    assert saved_step(exp_dir / "checkpoints" / "last.ckpt") == 12
    assert [p.name for p in runs.joinpath("interrupted").iterdir()] == ["run_0"]  # Every launch used one directory.
    config = yaml.safe_load((exp_dir / "config.yaml").read_text())["model"]["config"]
    assert (config["max_steps"], config["valid_every_n_steps"], config["exp_dir"]) == (12, None, str(exp_dir))
    launches = yaml.safe_load((exp_dir / "provenance" / "launches.yaml").read_text())
    assert [x["resumed"] for x in launches] == [False, True]


# ---------------------------------------------------------------------------------------------------------------------
# Slurm: the job's shape comes from slurm.*


@pytest.mark.unit
def test_slurm_submission_refuses_devices_and_nodes_the_job_would_not_have(fake_slurm: Path, tmp_path: Path) -> None:
    exp_dir, work = tmp_path / "run", tmp_path

    def submit(config: SlurmConfig, devices: Any, num_nodes: int) -> str:
        return slurm.submit(
            config, exp_dir=exp_dir, command=["t.py"], workdir=work, devices=devices, num_nodes=num_nodes
        )

    with pytest.raises(SlurmError) as info:
        submit(SlurmConfig(), 4, 2)
    message = str(info.value)
    assert "devices=4" in message and "slurm.gpus_per_node=1" in message, message
    assert "num_nodes=2" in message and "slurm.nodes=1" in message, message
    assert "set slurm.gpus_per_node=4 and slurm.nodes=2" in message, message
    assert fake_slurm.read_text() == "" and not (exp_dir / "slurm" / "job.sbatch").exists()
    with pytest.raises(SlurmError, match=r"devices=2 .* slurm.gpus_per_node=0 \(a CPU job: one task per node\)"):
        submit(SlurmConfig(gpus_per_node=0), 2, 1)

    assert submit(SlurmConfig(nodes=2, gpus_per_node=4), 4, 2) == "1234"  # Agreeing values, or left at defaults.
    assert submit(SlurmConfig(nodes=2, gpus_per_node=4), "auto", 1) == "1234"
    assert submit(SlurmConfig(gpus_per_node=0), "1", 1) == "1234"


@pytest.mark.unit
def test_a_time_limit_not_longer_than_the_requeue_warning_is_refused(fake_slurm: Path, tmp_path: Path) -> None:
    """The job got SIGUSR1 as it started: with nothing trained, it would checkpoint and requeue itself forever."""
    assert [slurm.time_limit_s(t) for t in ("90", "1:30", "0:01:30", "1-0", "1-2:3", "1-00:00:01")] == [
        5400,
        90,
        90,
        86400,
        93780,
        86401,
    ]
    assert slurm.time_limit_s("UNLIMITED") is None

    def submit(config: SlurmConfig) -> str:
        return slurm.submit(config, exp_dir=tmp_path / "run", command=["t.py"], workdir=tmp_path)

    with pytest.raises(SlurmError) as info:
        submit(SlurmConfig(time="1:30"))
    message = str(info.value)
    assert "slurm.time=1:30 (90 s) is not longer than slurm.signal_seconds=90" in message, message
    assert "Set a longer slurm.time, or a smaller slurm.signal_seconds" in message, message
    assert fake_slurm.read_text() == "" and not (tmp_path / "run" / "slurm" / "job.sbatch").exists()
    assert submit(SlurmConfig(time="1:30", signal_seconds=60)) == "1234"
    assert submit(SlurmConfig(time="unlimited")) == "1234"


@pytest.mark.unit
def test_slurm_launch_refuses_devices_and_nodes_at_submission(
    fake_slurm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, script = tmp_path / "runs", tmp_path / "my_task.py"
    script.touch()  # The job runs this script again.
    monkeypatch.setattr(sys, "argv", [str(script), "devices=4", "num_nodes=2", "accelerator=cpu", f"run_dir={runs}"])
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(BoringConfig(), launcher="slurm")
    assert info.value.code == 2
    assert "slurm.gpus_per_node=1" in capsys.readouterr().err
    assert fake_slurm.read_text() == "" and not list(runs.rglob("job.sbatch"))


@pytest.mark.unit
def test_inside_a_slurm_job_devices_and_nodes_must_match_what_srun_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_task(monkeypatch)
    runs = tmp_path / "runs"
    assert run_as_program(monkeypatch, "accelerator=cpu", "devices=4", "num_nodes=2", f"run_dir={runs}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert "devices=4" in err and "num_nodes=2" in err and "srun started 1 process(es) per node on 1 node" in err, err
    assert "slurm.gpus_per_node=4 and slurm.nodes=2" in err, err
    assert not runs.exists()

    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert resolve_hardware("cpu", 4, 2, "auto") == {
        "accelerator": "cpu",
        "devices": 4,
        "num_nodes": 2,
        "strategy": "ddp",
    }
    assert resolve_hardware("cpu", "auto", 1, "auto")["devices"] == 4  # Left at their defaults: srun's values.
    with pytest.raises(mlfab.ConfigError, match="num_nodes=3"):
        resolve_hardware("cpu", 4, 3, "auto")


def run_as_program(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`BoringTask.launch(BoringConfig())` as `python my_task.py ARGS` runs it; returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["my_task.py", *args])
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(BoringConfig())
    assert isinstance(info.value.code, int)
    return info.value.code


@pytest.mark.integration
@pytest.mark.parametrize("fit_first", [False, True])
def test_sigusr1_during_validate_in_a_slurm_job_says_it_goes_on(
    fit_first: bool,
    fake_slurm: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """In a Slurm job mlfab holds SIGUSR1 from the Trainer's start; outside training it did nothing, without a word.
    After a fit in the same Trainer, the fit's end gave SIGUSR1 back to its default, which killed the process."""
    in_task(monkeypatch)

    class Signalled(BoringTask):
        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 0 and self.trainer.state.fn == "validate":
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().validation_step(batch, batch_idx)

    before = signal.getsignal(signal.SIGUSR1)
    try:
        task = Signalled(BoringConfig(valid_batches=2, max_steps=2, valid_every_n_steps=None))
        trainer = mlfab.run.trainer.build_trainer(task.config, tmp_path / "run", [])
        if fit_first:
            trainer.fit(task)
        saved = sorted((tmp_path / "run" / "checkpoints").glob("*"))
        trainer.validate(task)
    finally:
        signal.signal(signal.SIGUSR1, before)
    err = capfd.readouterr().err
    assert "SIGUSR1: only training checkpoints and requeues the job; validate goes on." in err
    assert "scontrol requeue" not in fake_slurm.read_text()
    assert sorted((tmp_path / "run" / "checkpoints").glob("*")) == saved  # No checkpoint for the signal.
