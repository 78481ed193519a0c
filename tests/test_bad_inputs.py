"""Every bad input a user can give, as a table: the message they see (naming the key as typed), the exit status of
the program, and that it leaves an existing run as it was. A user error is `error: <message>` on stderr without a
traceback (unless MLFAB_TRACEBACK=1), exit status 2 for a usage error and 1 for a run that failed."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import mlfab
from mlfab.cli.main import main
from mlfab.config import SlurmConfig, build_config, check_config, resolve_config
from mlfab.errors import ERRORS_LOG, TRACEBACK_ENV, exit_code, report
from mlfab.run.distributed import resolve_hardware
from mlfab.testing import BoringConfig, BoringTask

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

# key=value -> what the listing says about it. Each is refused before anything is created.
BAD_VALUES = [
    ("learning_rate=-1", "key 'learning_rate': must be a number > 0 (got -1"),
    ("learning_rate=.inf", "key 'learning_rate': must be a number > 0 (got inf)"),
    ("betas=[2,0.999]", "key 'betas': must be two numbers in [0, 1) (got [2"),
    ("betas=[0.9]", "key 'betas': expected 2 items (tuple[float, float]), got 1: [0.9]"),
    ("weight_decay=-1", "key 'weight_decay': must be a number >= 0"),
    ("warmup_steps=-5", "key 'warmup_steps': must be an integer >= 0 (got -5)"),
    ("clip_grad_norm=-1", "key 'clip_grad_norm': must be a number > 0 or null"),
    ("clip_grad_norm=0", "null disables clipping"),
    ("batches_per_step=0", "key 'batches_per_step': must be an integer >= 1 (got 0)"),
    ("max_steps=0", "key 'max_steps': must be an integer >= 1 or null (got 0); null trains until stopped"),
    ("valid_every_n_steps=0", "key 'valid_every_n_steps': must be an integer >= 1 or null (got 0); null turns it off"),
    ("valid_every_n_seconds=0", "key 'valid_every_n_seconds': must be a number > 0 or null"),
    ("valid_first_n_seconds=-1", "key 'valid_first_n_seconds': must be a number > 0 or null"),
    ("valid_batches=-1", "key 'valid_batches': must be an integer >= 0 (got -1); 0 turns validation off"),
    ("save_every_n_steps=0", "key 'save_every_n_steps': must be an integer >= 1 or null"),
    ("save_every_n_seconds=0", "key 'save_every_n_seconds': must be a number > 0 or null"),
    ("keep_last_n_checkpoints=0", "key 'keep_last_n_checkpoints': must be an integer >= 1 (got 0); for no periodic"),
    ("max_bad_samples_in_a_row=0", "key 'max_bad_samples_in_a_row': must be an integer >= 1 or null"),
    ("max_nonfinite_steps_in_a_row=0", "key 'max_nonfinite_steps_in_a_row': must be an integer >= 1 or null"),
    ("num_dataloader_workers=-1", "key 'num_dataloader_workers': must be an integer >= 0"),
    ("batch_size=0", "key 'batch_size': must be an integer >= 1, or null for the task's get_batch_size() (got 0)"),
    ("seed=-1", "key 'seed': must be an integer from 0 to 4294967295 (got -1)"),
    ("seed=4294967296", "key 'seed': must be an integer from 0 to 4294967295"),
    ("num_nodes=0", "key 'num_nodes': must be an integer >= 1 (got 0)"),
    ("devices=0", "key 'devices': must be a number >= 1, auto, or GPU indices like '0,1' (got 0)"),
    ("devices=all", "key 'devices': must be a number >= 1, auto, or GPU indices"),
    ("accelerator=tpu", "key 'accelerator': must be one of auto, cpu, cuda, gpu, mps (got 'tpu')"),
    ("slurm.nodes=0", "key 'slurm.nodes': must be an integer >= 1 (got 0)"),
    ("slurm.gpus_per_node=-1", "key 'slurm.gpus_per_node': must be an integer >= 0"),
    ("slurm.cpus_per_task=0", "key 'slurm.cpus_per_task': must be an integer >= 1"),
    ("slurm.mem=lots", "key 'slurm.mem': must be an amount as sbatch --mem takes it"),
    ("slurm.time=tomorrow", "key 'slurm.time': must be a time limit as sbatch --time takes it"),
    ("slurm.partition=a b", "key 'slurm.partition': must be a partition name without spaces"),
    ("slurm.signal_seconds=0", "key 'slurm.signal_seconds': must be an integer from 1 to 65535"),
    # From a file no shell expands it: the runs went to a folder named `$RUN_DIR`.
    ("exp_dir=$RUN_DIR/sub", "key 'exp_dir': must be a path without $VARIABLES, which mlfab does not expand"),
]
TYPE_PROBLEMS = {"betas=[0.9]"}  # jsonargparse refuses these itself: in the fit form its own message names them.


@pytest.fixture(autouse=True)
def no_traceback_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)


def flag(arg: str) -> str:
    return f"--model.config.{arg}"


def run_as_program(monkeypatch: pytest.MonkeyPatch, task: Any, *args: str, config: Any = None) -> int:
    """`task.launch(config)` as `python my_task.py ARGS` runs it: the arguments from the command line."""
    monkeypatch.setattr(sys, "argv", ["my_task.py", *args])
    with pytest.raises(SystemExit) as info:
        task.launch(config if config is not None else BoringConfig())
    assert isinstance(info.value.code, int)
    return info.value.code


def stderr_of(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Config values


@pytest.mark.unit
@pytest.mark.parametrize(("arg", "expected"), BAD_VALUES, ids=[a for a, _ in BAD_VALUES])
def test_each_bad_value_is_named_and_exits_2(
    arg: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    assert run_as_program(monkeypatch, BoringTask, arg, f"run_dir={runs}") == 2
    err = stderr_of(capsys)
    assert err.startswith("error: Invalid config for BoringConfig (1 problem(s)):\n  - "), err
    assert expected in err
    assert not runs.exists()  # Refused before anything was created.


@pytest.mark.unit
def test_every_bad_value_is_reported_together_in_both_forms() -> None:
    args = [a for a, _ in BAD_VALUES if a not in TYPE_PROBLEMS]
    args = [a for a in args if a.partition("=")[0] not in ("learning_rate", "clip_grad_norm", "seed", "devices")]
    args += ["learning_rate=-1", "clip_grad_norm=0", "seed=-1", "devices=0"]  # One value per key: later ones win.
    expected = {a.partition("=")[0] for a in args}
    for argv, prefix in ((args, ""), (["fit", *map(flag, args)], "")):  # Config keys, in both forms.
        with pytest.raises(mlfab.ConfigError) as info:
            BoringTask.launch(argv=argv)
        message = str(info.value)
        assert f"({len(expected)} problem(s))" in message
        assert all(f"key {prefix + key!r}: must be" in message for key in expected), message


@pytest.mark.unit
def test_type_and_range_problems_are_listed_together() -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        BoringTask.launch(argv=["betas=[0.9]", "max_steps=abc", "learning_rate=0", "bach_size=3"])
    message = str(info.value)
    assert "(4 problem(s))" in message
    assert "key 'betas': expected 2 items (tuple[float, float]), got 1: [0.9]" in message
    assert "key 'max_steps': expected int | None (got 'abc')" in message
    assert "key 'learning_rate': must be a number > 0 (got 0)" in message
    assert "unknown key 'bach_size'; did you mean 'batch_size'?" in message
    assert "missing required" not in message


@pytest.mark.unit
def test_fit_form_type_refusal_is_jsonargparses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(argv=["fit", "--model.config.betas=[0.9]"])
    assert info.value.code == 2
    assert "Expected a tuple with 2 elements" in capsys.readouterr().err


@pytest.mark.unit
def test_rules_hold_for_files_scripts_dicts_checkpoints_and_dataclasses(tmp_path: Path) -> None:
    (tmp_path / "flat.yaml").write_text("keep_last_n_checkpoints: 0\n")
    (tmp_path / "run.yaml").write_text("model:\n  config:\n    valid_every_n_steps: 0\n")
    with pytest.raises(mlfab.ConfigError, match="key 'keep_last_n_checkpoints': must be an integer >= 1"):
        BoringTask.launch(argv=[str(tmp_path / "flat.yaml")])
    with pytest.raises(mlfab.ConfigError, match="key 'valid_every_n_steps': must be an integer >= 1"):
        BoringTask.launch(argv=[str(tmp_path / "run.yaml")])
    with pytest.raises(mlfab.ConfigError, match="key 'valid_every_n_steps': must be an integer >= 1"):
        BoringTask.launch(argv=["fit", "--config", str(tmp_path / "run.yaml")])
    # The script's own config, whatever the arguments.
    with pytest.raises(mlfab.ConfigError, match=r"(?s)\(1 problem.*key 'batches_per_step': must be an integer >= 1"):
        BoringTask.launch(BoringConfig(batches_per_step=0), argv=["--print_config"])
    with pytest.raises(mlfab.ConfigError, match=r"(?s)\(1 problem.*key 'batches_per_step': must be an integer >= 1"):
        BoringTask.launch({"batches_per_step": 0}, argv=["fit", "--print_config"])
    # Plain data: a dict, and a checkpoint's hyperparameters.
    with pytest.raises(mlfab.ConfigError, match=r"key 'slurm\.nodes': must be an integer >= 1 \(got 0\)"):
        resolve_config(BoringConfig, {"slurm": {"nodes": 0}})
    with pytest.raises(mlfab.ConfigError, match="key 'seed': must be an integer from 0"):
        BoringTask({"seed": -1})
    # A dataclass built in Python (Task.__init__ checks it with check_config).
    with pytest.raises(mlfab.ConfigError, match=r"(?s)\(2 problem\(s\)\).*'warmup_steps'.*'slurm.time'"):
        check_config(BoringConfig(warmup_steps=-5, slurm=SlurmConfig(time="tomorrow")))
    check_config(BoringConfig(valid_batches=0, clip_grad_norm=None, devices="0,1", max_steps=None))


@pytest.mark.unit
def test_keys_are_named_with_the_prefix_of_the_form_used() -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        build_config(BoringConfig, {"learning_rate": -1, "slurm": {"nodes": 0}}, prefix="model.config.")
    assert "key 'model.config.learning_rate': must be a number > 0 (got -1)" in str(info.value)
    assert "key 'model.config.slurm.nodes': must be an integer >= 1 (got 0)" in str(info.value)
    with pytest.raises(mlfab.ConfigError, match=r"key 'model\.config\.max_steps': expected int \| None"):
        build_config(BoringConfig, {"max_steps": "x"}, prefix="model.config.")


@pytest.mark.unit
def test_good_values_at_the_edges_are_accepted() -> None:
    config = resolve_config(
        BoringConfig,
        {
            "betas": [0, 0.999],
            "weight_decay": 0,
            "warmup_steps": 0,
            "seed": 0,
            "valid_batches": 0,
            "num_dataloader_workers": 0,
            "devices": "3,",
            "learning_rate": "1e-3",
            "max_bad_samples_in_a_row": None,
            "slurm": {"time": "90", "mem": "500m", "gpus_per_node": 0, "partition": "gpu,cpu"},
        },
    )
    assert config.learning_rate == 1e-3 and config.slurm.time == "90"
    for time in ("1-00:00:00", "12:00:00", "2-12", "UNLIMITED"):
        check_config(SlurmConfig(time=time))


@dataclass(kw_only=True)
class OwnRates(BoringConfig):
    learning_rate: float = mlfab.field(0.01, help="The same type: the rule still holds")
    max_steps: str | None = mlfab.field("0", help="Another type: mlfab's rule for max_steps is not its")
    keep_last_n_checkpoints: int = mlfab.field(0, help="A default out of range")


@pytest.mark.unit
def test_rules_follow_subclasses_that_keep_a_fields_type() -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        resolve_config(OwnRates, {"learning_rate": -1})
    message = str(info.value)
    assert "Invalid config for OwnRates (2 problem(s))" in message
    assert "key 'learning_rate'" in message and "key 'keep_last_n_checkpoints'" in message
    assert "max_steps" not in message


# ---------------------------------------------------------------------------------------------------------------------
# Hardware the machine lacks


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.unit
@pytest.mark.parametrize("accelerator", ["cuda", "gpu", "mps"])
def test_missing_accelerator_is_named_with_what_there_is(accelerator: str, no_gpu: None) -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        resolve_hardware(accelerator, "auto", 1, "auto")
    message = str(info.value)
    assert message.startswith(f"accelerator={accelerator} asks for")
    assert "Available here: cpu. Set accelerator to one of them, or to auto." in message
    assert resolve_hardware("auto", "auto", 1, "auto")["accelerator"] == "cpu"


@pytest.mark.unit
def test_more_gpus_than_there_are_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_hardware("gpu", "auto", 1, "auto")["devices"] == 2  # gpu is cuda here: every GPU.
    with pytest.raises(mlfab.ConfigError, match=r"devices=4, but this machine has 2 CUDA GPU\(s\)"):
        resolve_hardware("cuda", 4, 1, "auto")


# ---------------------------------------------------------------------------------------------------------------------
# Tasks that cannot train


class NoGrad(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        return super().get_loss(batch, state).detach()


class Frozen(BoringTask):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.layer.requires_grad_(False)


class NotADataset(BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return 42


class NeedsData(BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> Any:
        mlfab.get_data_dir()  # No DATA_DIR in the tests: a settings error.
        return super().get_dataset(phase)


class Diverging(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        return super().get_loss(batch, state) * float("nan")


class Crashing(BoringTask):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        raise RuntimeError("boom: a bug, not a user error")


# task, arguments, exit status, what stderr says after "error: ", whether the run had started (wrote its records).
FAILURES = [
    (NoGrad, [], 2, "NoGrad.get_loss returned a loss ('loss') that does not depend on any trainable parameter", True),
    (Frozen, [], 2, "Frozen has nothing to train: all 2 of its parameters are frozen (requires_grad=False)", False),
    (NeedsData, [], 2, "The data directory is not set", False),
    (NotADataset, [], 1, "NotADataset.get_dataset('train') returned int, which is not a dataset", False),
    (Diverging, ["max_nonfinite_steps_in_a_row=1"], 1, "1 optimizer steps in a row had a non-finite loss", True),
    # Schedule-free AdamW divided by it at the first validation: a ZeroDivisionError traceback after training began.
    (BoringTask, ["betas=[0,0.999]"], 2, "betas=[0.0, 0.999]: the default optimizer, schedule-free AdamW", False),
    # Each worker a process: 100000 of them forked until the machine ran out of memory, with only torch's warning.
    (BoringTask, ["num_dataloader_workers=100000"], 2, "num_dataloader_workers=100000 is more than 8 worker", False),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("task", "args", "code", "expected", "started"), FAILURES, ids=[f[0].__name__ for f in FAILURES]
)
def test_a_run_that_cannot_train_says_why(
    task: type,
    args: list[str],
    code: int,
    expected: str,
    started: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exp = tmp_path / "run"
    assert run_as_program(monkeypatch, task, f"exp_dir={exp}", "max_steps=3", *args) == code
    err = stderr_of(capsys)
    assert err.startswith(f"error: {expected}"), err
    log = exp / ERRORS_LOG
    if started:  # The traceback is kept with the run.
        assert err.endswith(f"(traceback in {log})\n")
        assert "Traceback (most recent call last)" in log.read_text() and expected in log.read_text()
    else:  # Refused before it started: no run directory is left (mlfab.run.pipeline.execute).
        assert "(traceback in" not in err and not exp.exists()


@pytest.mark.unit
@pytest.mark.parametrize("accelerator", ["cuda", "mps"])
def test_missing_accelerator_exits_2(
    accelerator: str, no_gpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_as_program(monkeypatch, BoringTask, f"accelerator={accelerator}", f"exp_dir={tmp_path / 'run'}") == 2
    assert stderr_of(capsys).startswith(f"error: accelerator={accelerator} asks for")


@pytest.mark.unit
def test_slurm_without_sbatch_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("mlfab.run.slurm.shutil.which", lambda name: None)
    script = tmp_path / "my_task.py"  # What the Slurm job would run again.
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script), f"run_dir={tmp_path}"])
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(BoringConfig(), launcher="slurm")
    assert info.value.code == 2
    assert stderr_of(capsys).startswith("error: sbatch not found: launcher='slurm' needs a Slurm login node")


@pytest.mark.integration
def test_a_crash_that_is_not_a_user_error_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["my_task.py", f"exp_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="boom"):
        Crashing.launch(BoringConfig())
    assert not (tmp_path / "run" / ERRORS_LOG).exists()


@pytest.mark.unit
def test_with_argv_given_the_error_is_raised() -> None:
    with pytest.raises(mlfab.ConfigError, match="key 'batches_per_step'"):
        BoringTask.launch(argv=["batches_per_step=0"])
    with pytest.raises(mlfab.ConfigError, match="key 'batches_per_step'"):
        main(["fit", "--model", "mlfab.testing.BoringTask", "--model.config.batches_per_step=0"])


@pytest.mark.unit
def test_console_script_exits_2_with_the_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["mlfab", "fit", "--model", "mlfab.testing.BoringTask", "--model.config.seed=-1"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert stderr_of(capsys).startswith("error: Invalid config for BoringConfig (1 problem(s)):\n  - key 'seed'")


# ---------------------------------------------------------------------------------------------------------------------
# report: the message, the status, the traceback on request and in the run directory


@pytest.mark.unit
def test_exit_status_of_each_error() -> None:
    usage = [mlfab.ConfigError, mlfab.SettingsError, mlfab.TaskDefinitionError, mlfab.SlurmError]
    failed = [mlfab.DatasetError, mlfab.CheckpointError, mlfab.NonFiniteError]
    assert [exit_code(e("x")) for e in usage] == [2] * 4
    assert [exit_code(e("x")) for e in failed] == [1] * 3


def raised(error: Exception) -> Exception:
    try:
        raise error from KeyError("the cause")
    except Exception as e:
        return e


@pytest.mark.unit
def test_report_prints_the_message_and_the_traceback_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    error = raised(mlfab.DatasetError("no data"))
    assert report(error) == 1
    assert stderr_of(capsys) == "error: no data\n"
    monkeypatch.setenv("MLFAB_TRACEBACK", "1")
    assert report(error, tmp_path) == 1
    err = capsys.readouterr().err
    assert "KeyError: 'the cause'" in err and "Traceback (most recent call last)" in err
    assert "The above exception was the direct cause" in err
    assert err.endswith(f"error: no data\n(traceback in {tmp_path / ERRORS_LOG})\n")
    report(raised(mlfab.ConfigError("second")), tmp_path)
    log = (tmp_path / ERRORS_LOG).read_text()
    assert log.count("--- ") == 2 and "DatasetError: no data" in log and "ConfigError: second" in log


@pytest.mark.unit
def test_report_without_a_writable_run_directory_still_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "logs").write_text("a file where the folder would go")
    assert report(raised(mlfab.CheckpointError("bad checkpoint")), tmp_path) == 1
    assert stderr_of(capsys) == "error: bad checkpoint\n"


# ---------------------------------------------------------------------------------------------------------------------
# An existing run is left as it was


def snapshot(exp: Path) -> dict[str, bytes]:
    files = [exp / "config.yaml", *sorted((exp / "checkpoints").iterdir())]
    return {str(p.relative_to(exp)): p.read_bytes() for p in files}


@pytest.mark.slow
def test_bad_inputs_leave_an_existing_run_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "run"
    BoringTask.launch(BoringConfig(exp_dir=str(exp), max_steps=2), argv=[])
    before = snapshot(exp)
    assert "checkpoints/last.ckpt" in before
    bad = [a for a, _ in BAD_VALUES if not a.startswith("exp_dir=")]  # (The run's own exp_dir comes later and wins.)
    cases = [[a, f"exp_dir={exp}"] for a in bad]
    cases += [["fit", f"--model.config.exp_dir={exp}", flag(a)] for a in bad if a not in TYPE_PROBLEMS]
    cases += [["accelerator=cuda", f"exp_dir={exp}"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in cases:
        assert run_as_program(monkeypatch, BoringTask, *args, config=BoringConfig(max_steps=2)) == 2, args
        assert stderr_of(capsys).startswith(("error: Invalid config for BoringConfig", "error: accelerator=cuda"))
        assert snapshot(exp) == before, args


class OtherTask(BoringTask):
    pass


@pytest.mark.integration
@pytest.mark.parametrize("task", [OtherTask, BoringTask], ids=["another task", "another shape"])
def test_an_incompatible_relaunch_leaves_config_yaml_as_it_was(
    task: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "run"
    BoringTask.launch(BoringConfig(exp_dir=str(exp), max_steps=2), argv=[])
    before = snapshot(exp)
    args = [f"exp_dir={exp}", *(["in_dim=3"] if task is BoringTask else [])]
    assert run_as_program(monkeypatch, task, *args, config=BoringConfig(max_steps=2)) == 1
    named = f"exp_dir {exp} is a run of BoringTask" if task is OtherTask else f"Checkpoint {exp / 'checkpoints'}"
    assert stderr_of(capsys).startswith(f"error: {named}")
    assert snapshot(exp) == before


# ---------------------------------------------------------------------------------------------------------------------
# Real processes: what a user sees in a terminal

SCRIPT = """
import sys
from mlfab.testing import BoringConfig, BoringTask

class Diverging(BoringTask):
    def get_loss(self, batch, state):
        return super().get_loss(batch, state) * float("nan")

if __name__ == "__main__":
    {"boring": BoringTask, "diverging": Diverging}[sys.argv.pop(1)].launch(BoringConfig())
"""


def run_program(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "tasks.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), *args] if args[0] != "mlfab" else [sys.executable, "-c", MLFAB, *args[1:]]
    environ = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    return subprocess.run(
        command,
        env={**environ, "PYTHONPATH": PYTHONPATH, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


MLFAB = "from mlfab.cli.main import main; raise SystemExit(main())"  # The console script, installed or not.


@pytest.mark.integration
def test_subprocess_bad_value_prints_one_message_and_exits_2(tmp_path: Path) -> None:
    proc = run_program(tmp_path, ["boring", "learning_rate=-1", "keep_last_n_checkpoints=0", f"run_dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: Invalid config for BoringConfig (2 problem(s)):\n  - key 'learning_rate'")
    assert "Traceback" not in proc.stderr and "keep_last_n_checkpoints" in proc.stderr


@pytest.mark.integration
def test_subprocess_traceback_on_request(tmp_path: Path) -> None:
    proc = run_program(tmp_path, ["boring", "valid_every_n_steps=0"], MLFAB_TRACEBACK="1")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "key 'valid_every_n_steps': must be an integer >= 1 or null (got 0); null turns it off"
    )


@pytest.mark.integration
def test_subprocess_failed_run_exits_1_with_the_traceback_in_the_run_directory(tmp_path: Path) -> None:
    exp = tmp_path / "run"
    proc = run_program(tmp_path, ["diverging", f"exp_dir={exp}", "max_nonfinite_steps_in_a_row=2"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: 2 optimizer steps in a row had a non-finite loss 'loss'" in proc.stderr
    assert proc.stderr.endswith(f"(traceback in {exp / ERRORS_LOG})\n")
    assert "mlfab.errors.NonFiniteError" in (exp / ERRORS_LOG).read_text()


@pytest.mark.integration
def test_subprocess_console_script_exits_2(tmp_path: Path) -> None:
    proc = run_program(tmp_path, ["mlfab", "fit", "--model", "mlfab.testing.BoringTask", "--model.config.batch_size=0"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: Invalid config for BoringConfig (1 problem(s)):\n  - key 'batch_size'")
    assert "Traceback" not in proc.stderr
