"""Which value the command line gives a config key: a dotted key into a tuple, list or scalar is refused (it was read
as the pair (index, value)), and an evaluation of a run without `--ckpt_path` gets the run's config."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import mlfab
from mlfab.cli.parser import launch
from mlfab.testing import BoringConfig, BoringTask, read_scalars

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Layers:
    hidden: int = mlfab.field(32, help="Hidden units")


@dataclass(kw_only=True)
class ValuesConfig(BoringConfig):
    crop: tuple[int, int] = mlfab.field((32, 32), help="Crop height, width")
    sizes: list[int] = mlfab.field(list, help="A list")
    table: dict[str, int] = mlfab.field(dict, help="A mapping")
    model: Layers = mlfab.field(Layers, help="A nested config")


class ValuesTask(BoringTask, mlfab.Task[ValuesConfig]):
    pass


def printed_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    with pytest.raises(SystemExit) as info:
        ValuesTask.launch(argv=[*argv, "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]["config"]


@pytest.mark.unit
def test_a_dotted_key_into_a_tuple_list_or_scalar_is_refused_with_every_other_problem(tmp_path: Path) -> None:
    """`crop.1=16` gave crop (1, 16) and `betas.0=0.8` betas (0.0, 0.8), silently: jsonargparse read the index and
    the value as the tuple."""
    argv = ["crop.1=16", "betas.0=0.8", "sizes.0=3", "max_steps.a=3", "bach_size=3", f"run_dir={tmp_path / 'runs'}"]
    with pytest.raises(mlfab.ConfigError) as info:
        ValuesTask.launch(argv=argv)
    message = str(info.value)
    assert "(5 problem(s))" in message, message
    assert "key 'crop.1': crop (tuple[int, int]) takes a whole value" in message, message
    assert "give the whole value, e.g. crop=[32,16]" in message, message
    assert "e.g. betas=[0.8,0.999]" in message, message
    assert "key 'sizes.0': sizes (list[int])" in message, message
    assert "key 'max_steps.a': max_steps (int | None)" in message, message
    assert "unknown key 'bach_size'; did you mean 'batch_size'?" in message, message
    assert not (tmp_path / "runs").exists()  # Refused before any run.


@pytest.mark.unit
def test_a_dotted_flag_into_a_tuple_is_refused_in_the_fit_form() -> None:
    for argv in (
        ["fit", "--model.config.crop.1", "16", "--model.config.betas.0=0.8"],
        ["validate", "--model.config.crop.1=16", "--model.config.betas.0", "0.8"],
    ):
        with pytest.raises(mlfab.ConfigError) as info:
            ValuesTask.launch(argv=argv)
        message = str(info.value)
        assert "(2 problem(s))" in message, message
        assert "--model.config.crop.1: crop (tuple[int, int]) takes a whole value" in message, message
        assert "e.g. --model.config.crop [32,16]" in message, message
        assert "e.g. --model.config.betas [0.8,0.999]" in message, message


@pytest.mark.unit
def test_the_example_is_made_from_the_value_given_before(tmp_path: Path) -> None:
    (tmp_path / "crop.yaml").write_text("crop: [64, 48]\n")
    with pytest.raises(mlfab.ConfigError, match=r"e\.g\. crop=\[64,16\]"):
        ValuesTask.launch(argv=[str(tmp_path / "crop.yaml"), "crop.1=16"])
    with pytest.raises(mlfab.ConfigError, match=r"e\.g\. --model\.config\.crop \[8,16\]"):
        ValuesTask.launch(ValuesConfig(crop=(8, 8)), argv=["fit", "--model.config.crop.1", "16"])


@pytest.mark.unit
def test_the_refusal_is_an_error_line_with_exit_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["task.py", "crop.1=16"])
    with pytest.raises(SystemExit) as info:
        launch(ValuesTask)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: Invalid config for ValuesConfig (1 problem(s)):\n  - key 'crop.1'"
    )


@pytest.mark.unit
def test_dotted_keys_into_nested_configs_and_mappings_still_set_one_entry(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["model.hidden=3", "slurm.nodes=2", "table.a=1", "compile.fullgraph=true", "crop=[32,16]"],
        ["fit", "--model.config.model.hidden", "3", "--model.config.slurm.nodes=2", "--model.config.table.a", "1"]
        + ["--model.config.compile.fullgraph=true", "--model.config.crop", "[32,16]"],
    ):
        config = printed_config(argv, capsys)
        assert config["model"] == {"hidden": 3} and config["slurm"]["nodes"] == 2, argv
        assert config["table"] == {"a": 1} and config["compile"] == {"fullgraph": True}, argv
        assert config["crop"] == [32, 16], argv


@pytest.mark.unit
def test_help_with_a_dotted_key_into_a_tuple_shows_no_wrong_current_value(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["crop.1=16", "--help"], ["fit", "--model.config.crop.1", "16", "--help"]):
        with pytest.raises(SystemExit) as info:
            ValuesTask.launch(argv=argv)
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "Crop height, width (type: tuple[int, int]" in text and "[current:" not in text, argv


# ---------------------------------------------------------------------------------------------------------------------
# validate / test / predict into a run directory, without --ckpt_path

SCRIPT = """
from mlfab.testing import BoringConfig, BoringTask

if __name__ == "__main__":
    BoringTask.launch(BoringConfig())
"""


def run_script(tmp_path: Path, *args: str) -> str:
    script = tmp_path / "task.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def launch_config(run: Path, index: int) -> dict[str, Any]:
    """The config recorded for the run's launch `index` (`provenance/launches.yaml`)."""
    launches = yaml.safe_load((run / "provenance" / "launches.yaml").read_text())
    return yaml.safe_load((run / "provenance" / launches[index]["config_record"]).read_text())["model"]["config"]


@pytest.mark.slow
def test_validate_into_a_run_without_ckpt_path_uses_the_runs_config(tmp_path: Path) -> None:
    """It evaluated the newest checkpoint with the script's defaults (batch_size 8, max_steps 20), not the run's:
    another loss than `--ckpt_path` of the same checkpoint, logged into the run at its step, and a config.N.yaml of
    the wrong values in its provenance."""
    run = tmp_path / "run"
    train = ["batch_size=4", "max_steps=6", "valid_every_n_steps=3", "save_every_n_seconds=null", f"exp_dir={run}"]
    run_script(tmp_path, *train)
    trained = yaml.safe_load((run / "config.yaml").read_text())["model"]["config"]
    assert (trained["batch_size"], trained["max_steps"]) == (4, 6)

    out = run_script(tmp_path, "validate", f"--model.config.exp_dir={run}")
    assert f"Weights from {run / 'checkpoints' / 'last.ckpt'}" in out and "[valid] step 6/6 " in out, out
    run_script(tmp_path, "validate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")

    valid = read_scalars(run / "tensorboard" / "valid")["loss/loss"]
    final, without, with_ckpt = valid[-3:]  # The fit's last validation, then the two evaluations.
    assert final[0] == without[0] == with_ckpt[0] == 6, valid
    assert without[1] == pytest.approx(with_ckpt[1], rel=1e-6) == pytest.approx(final[1], rel=1e-6), valid
    assert launch_config(run, 1) == launch_config(run, 2) == trained
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["config"] == trained


@pytest.mark.integration
def test_flags_given_to_an_evaluation_of_a_run_win_over_its_config(tmp_path: Path) -> None:
    """As with `--ckpt_path`: the checkpoint's config under the values given."""
    run = tmp_path / "run"
    ValuesTask.launch(
        argv=["batch_size=4", "max_steps=4", "valid_every_n_steps=null", "save_every_n_seconds=null", f"exp_dir={run}"]
    )
    ValuesTask.launch(argv=["test", f"--model.config.exp_dir={run}", "--model.config.valid_batches=1"])
    config = launch_config(run, 1)
    assert (config["batch_size"], config["max_steps"], config["valid_batches"]) == (4, 4, 1)
    assert [step for step, _ in read_scalars(run / "tensorboard" / "test")["loss/loss"]] == [4]
