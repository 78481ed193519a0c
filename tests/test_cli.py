"""The command line as a product: the mlfab form, Lightning's CLI (`fit`, `validate`, `test`), the `mlfab` script,
config.yaml as the one record of a run, and the messages a user sees."""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

import mlfab
from mlfab.cli.args import config_file_args, short_form_args
from mlfab.cli.main import import_task, main
from mlfab.cli.parser import run_cli
from mlfab.config import resolve_config
from mlfab.run.invocation import command_name
from mlfab.testing import BoringConfig, BoringTask

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Layers:
    hidden: int = mlfab.field(32, help="Hidden units of each layer")
    depth: int = mlfab.field(2, help="Number of layers")


@dataclass(kw_only=True)
class NestedConfig(BoringConfig):
    model: Layers = mlfab.field(Layers, help="The network")


class NestedTask(BoringTask, mlfab.Task[NestedConfig]):
    pass


@dataclass(kw_only=True)
class RequiredConfig(mlfab.Config):
    width: int = mlfab.field(help="A field without a default")


class RequiredTask(BoringTask, mlfab.Task[RequiredConfig]):
    def __init__(self, config: RequiredConfig) -> None:
        mlfab.Task.__init__(self, config)
        self.layer = nn.Linear(4, 1)


@dataclass(kw_only=True)
class ChildConfig(BoringConfig):
    extra: int = mlfab.field(7, help="A field only the child config has")


class ChildTask(BoringTask, mlfab.Task[ChildConfig]):  # No __init__ of its own.
    pass


@dataclass
class Inner:
    config: int = mlfab.field(1, help="A field named config")


@dataclass(kw_only=True)
class OwnModelConfig(BoringConfig):
    model: Inner = mlfab.field(Inner, help="Nested")


class OwnModelTask(BoringTask, mlfab.Task[OwnModelConfig]):
    pass


def fit(tmp_path: Path, *args: str, task: type = BoringTask, command: str = "fit") -> Path:
    """Runs Lightning's CLI in this process; returns the new run directory."""
    root = tmp_path / "runs" / "boring_task"
    before = set(root.iterdir()) if root.is_dir() else set()
    assert run_cli(task, [command, f"--model.config.run_dir={tmp_path / 'runs'}", *args]) == 0
    (exp,) = set(root.iterdir()) - before
    return exp


def run_file(exp: Path) -> dict:
    return yaml.safe_load((exp / "config.yaml").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# The mlfab form: python -m my.task [file.yaml ...] [key=value ...] [--help]


def help_text(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().out.split())  # The help is wrapped to the terminal width.


@pytest.mark.unit
def test_help_shows_types_current_values_and_nested_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        NestedTask.launch(NestedConfig(batch_size=3), argv=["model.hidden=64", "max_steps=7", "--help"])
    assert info.value.code == 0
    out = help_text(capsys)
    assert "[config.yaml ...] [key=value ...]" in out and "{fit,validate,test,predict}" in out
    assert "key=value stands for --model.config.key=value" in out
    # The script's value is the default, not the class's; what the arguments set is the current value.
    assert "--model.config.batch_size BATCH_SIZE Samples per batch (type: int, default: 3)" in out
    assert "--model.config.max_steps MAX_STEPS Training steps [current: 7] (type: int | null, default: 20)" in out
    assert "--model.config.model.hidden HIDDEN Hidden units of each layer [current: 64] (type: int, default: 32)" in out
    assert "--model.config.model.depth DEPTH Number of layers (type: int, default: 2)" in out
    assert "(type: tuple[float, float], default: [0.9, 0.999])" in out
    assert "--trainer.max_time" in out and "--ckpt_path" in out  # One help: the short form is `fit`.


@pytest.mark.unit
def test_both_forms_print_the_same_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        BoringTask.launch(argv=["--help"])
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        BoringTask.launch(argv=["fit", "--help"])
    assert short.endswith(capsys.readouterr().out)


@pytest.mark.unit
def test_help_applies_yaml_files_and_marks_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("width: 5\n")
    with pytest.raises(SystemExit):
        RequiredTask.launch(argv=["--help"])
    assert "--model.config.width WIDTH A field without a default (required, type: int)" in help_text(capsys)
    with pytest.raises(SystemExit):
        RequiredTask.launch(argv=[str(tmp_path / "a.yaml"), "--help"])
    assert "A field without a default [current: 5] (required, type: int)" in help_text(capsys)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["max_steps=abc"], ["key 'max_steps': expected int | None (got 'abc')"]),
        (["betas=[0.5, x]"], ["key 'betas': expected tuple[float, float]; item 1:", "(got [0.5, 'x'])"]),
        (["precision=fp8"], ["key 'precision': expected 'auto' | '32-true'", "(got 'fp8')"]),
        (["bach_size=3"], ["unknown key 'bach_size'; did you mean 'batch_size'?"]),
        (["model.hiden=3"], ["unknown key 'model.hiden'; did you mean 'model.hidden'?"]),
        (["model.depth=deep"], ["key 'model.depth': expected int (got 'deep')"]),
        # A prefix of one key was that key (argparse's abbreviations): batches_per_step=4, silently.
        (["batches=4"], ["unknown key 'batches'; did you mean"]),
        (["max_step=3"], ["unknown key 'max_step'; did you mean 'max_steps'"]),
        # Lightning's own traceback ("You selected an invalid strategy name"), naming no key.
        (["strategy=dpp"], ["key 'strategy': must be auto or a strategy name Lightning knows (ddp, ddp_spawn,"]),
    ],
)
def test_config_errors_name_key_expected_type_and_value(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        NestedTask.launch(NestedConfig(), argv=[*args, f"run_dir={tmp_path}"])
    for text in expected:
        assert text in str(info.value)


@pytest.mark.unit
def test_missing_required_key_is_reported(tmp_path: Path) -> None:
    with pytest.raises(mlfab.ConfigError, match=r"missing required key 'width': set it in the config or pass width="):
        RequiredTask.launch(argv=[f"run_dir={tmp_path}"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [("batch_size: [1\n", "is not valid YAML"), ("- 1\n- 2\n", "must hold a mapping of config keys")],
)
def test_bad_yaml_file_is_reported(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(mlfab.ConfigError, match=expected):
        BoringTask.launch(argv=[str(tmp_path / "bad.yaml")])


@pytest.mark.unit
def test_missing_yaml_file_is_reported() -> None:
    with pytest.raises(mlfab.ConfigError, match=r"Config file 'nope.yaml' not found"):
        BoringTask.launch(argv=["nope.yaml"])


@pytest.mark.unit
def test_lightning_flag_in_mlfab_form_points_to_both_forms() -> None:
    with pytest.raises(mlfab.ConfigError) as info:
        BoringTask.launch(argv=["--max_steps=3"])
    assert "e.g. max_steps=3 or `" in str(info.value)  # The value typed, as a key=value argument.
    assert "fit --model.config.max_steps" in str(info.value)


def printed_config(capsys: pytest.CaptureFixture[str], task: type, argv: list[str]) -> dict:
    """What `--print_config` prints for `argv`: the run file the arguments make, nothing trained."""
    with pytest.raises(SystemExit) as info:
        task.launch(argv=[*argv, "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.unit
def test_flat_file_and_run_file_give_the_same_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "flat.yaml").write_text("in_dim: 3\nbetas: [0.5, 0.6]\n")
    (tmp_path / "run.yaml").write_text("model:\n  config:\n    in_dim: 3\n    betas: [0.5, 0.6]\ntrainer: {}\n")
    flat = printed_config(capsys, BoringTask, [str(tmp_path / "flat.yaml")])
    assert printed_config(capsys, BoringTask, [str(tmp_path / "run.yaml")]) == flat
    assert flat["model"]["config"]["in_dim"] == 3 and flat["model"]["config"]["betas"] == [0.5, 0.6]


@pytest.mark.unit
def test_a_run_file_with_trainer_settings_applies_them_in_the_short_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  config:\n    in_dim: 3\ntrainer:\n  max_time: '00:00:01:00'\n")
    printed = printed_config(capsys, BoringTask, [str(path), "max_steps=4"])
    assert printed["trainer"] == {"max_time": "00:00:01:00"}
    assert printed["model"]["config"]["in_dim"] == 3 and printed["model"]["config"]["max_steps"] == 4


@pytest.mark.integration
def test_both_forms_write_byte_identical_config_yaml(tmp_path: Path) -> None:
    exp = tmp_path / "run"  # The same run directory for both (the file names itself in its header).
    BoringTask.launch(argv=[f"exp_dir={exp}", "max_steps=2", "betas=[0.5,0.6]", "clip_grad_norm=null"])
    short = (exp / "config.yaml").read_bytes()
    shutil.rmtree(exp)
    BoringTask.launch(
        argv=[
            "fit",
            f"--model.config.exp_dir={exp}",
            "--model.config.max_steps=2",
            "--model.config.betas=[0.5,0.6]",
            "--model.config.clip_grad_norm=null",
        ]
    )
    assert (exp / "config.yaml").read_bytes() == short
    assert b"clip_grad_norm: null" in short and b"- 0.5" in short


@pytest.mark.unit
def test_config_with_its_own_model_config_field_reads_flat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "own.yaml").write_text("model:\n  config: 5\n")
    assert printed_config(capsys, OwnModelTask, [str(tmp_path / "own.yaml")])["model"]["config"]["model"] == {
        "config": 5
    }
    assert resolve_config(OwnModelConfig, {"model": {"config": 5}}).model.config == 5


# ---------------------------------------------------------------------------------------------------------------------
# The Lightning form: python -m my.task fit|validate|test ...


@pytest.mark.unit
def test_fit_help_shows_field_help_and_precedence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        BoringTask.launch(BoringConfig(in_dim=6), argv=["fit", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # The help is wrapped to the terminal width.
    assert "--model.config.batch_size BATCH_SIZE Samples per batch (type: int, default: 8)" in out
    assert "--model.config.in_dim IN_DIM Input features (type: int, default: 6)" in out
    assert "Validate every N seconds of wall-clock time" in out
    assert "values you give are never replaced by the checkpoint's" in out
    assert "--trainer.max_steps" in out and "--ckpt_path" in out


@pytest.mark.unit
def test_fit_help_of_subclass_without_init_shows_its_own_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(ChildTask, ["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.config.extra EXTRA A field only the child config has (type: int, default: 7)" in out


@pytest.mark.integration
def test_fit_runs_like_launch_and_explicit_trainer_args_win(tmp_path: Path) -> None:
    exp = fit(tmp_path, "--model.config.max_steps=5", "--trainer.max_steps=3", "--model.config.in_dim=3")
    assert exp == tmp_path / "runs" / "boring_task" / "run_0"
    data = run_file(exp)
    # The Trainer's max_steps is the config's (what a relaunch of config.yaml, progress and time/remaining read),
    # recorded there only; the trainer section holds what was given and no config key holds.
    assert data["model"]["config"]["max_steps"] == 3 and data["model"]["config"]["in_dim"] == 3
    assert data["trainer"] == {}
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (exp / "tensorboard" / "train").is_dir()  # The task's default loggers.
    assert "#   val_check_interval: 10\n" in (exp / "config.yaml").read_text()  # Derived settings, for the record.


@pytest.mark.integration
def test_trainer_arguments_that_set_a_config_key_set_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--trainer.accelerator cpu` over a config's `accelerator: cuda` trains on the CPU (the config's value was
    resolved first, and refused on a machine without CUDA); each such argument is the config's value too."""
    exp = fit(
        tmp_path,
        "--model.config.in_dim=3",
        "--model.config.accelerator=cuda",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.precision=32",
        "--trainer.limit_val_batches=3",
        "--trainer.gradient_clip_val=0",
        "--seed_everything=0",
    )
    config = run_file(exp)["model"]["config"]
    assert {k: config[k] for k in ("accelerator", "max_steps", "batches_per_step", "precision")} == {
        "accelerator": "cpu",
        "max_steps": 2,
        "batches_per_step": 2,
        "precision": "32-true",
    }
    assert config["valid_batches"] == 3 and config["clip_grad_norm"] is None and config["seed"] == 0
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    # A share of the validation set (1 is all of it) is the Trainer's alone: valid_batches keeps the config's count.
    capsys.readouterr()
    for share in ("0.5", "1"):
        with pytest.raises(SystemExit):
            run_cli(
                BoringTask, ["fit", "--model.config.in_dim=3", f"--trainer.limit_val_batches={share}", "--print_config"]
            )
        assert yaml.safe_load(capsys.readouterr().out)["model"]["config"]["valid_batches"] == BoringConfig.valid_batches


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flag", "rule"),
    [
        ("--trainer.gradient_clip_val=-1", "key 'clip_grad_norm': must be a number > 0 or null (got -1.0)"),
        ("--trainer.max_steps=0", "key 'max_steps': must be an integer >= 1 or null (got 0)"),
        ("--trainer.limit_val_batches=-3", "key 'valid_batches': must be an integer >= 0 (got -3)"),
    ],
)
def test_trainer_arguments_that_set_a_config_key_are_held_to_its_rule(tmp_path: Path, flag: str, rule: str) -> None:
    """They skipped the key's range check and went to Lightning as they were: gradient_clip_val=-1 flipped every
    gradient (training climbed the loss) while config.yaml said clip_grad_norm: 10.0; max_steps=0 trained nothing."""
    with pytest.raises(mlfab.ConfigError) as info:
        run_cli(BoringTask, ["fit", f"--model.config.run_dir={tmp_path / 'runs'}", flag])
    name, _, value = flag.partition("=")
    assert str(info.value).startswith(f"{name} {float(value) if 'clip' in name or 'limit' in name else int(value)}")
    assert f"so it is held to its rule: {rule}" in str(info.value)
    assert not (tmp_path / "runs").exists()  # Refused before the run started.


@pytest.mark.integration
def test_a_file_of_trainer_arguments_is_read_as_the_flags(tmp_path: Path) -> None:
    """`--trainer FILE` (LightningCLI's file of Trainer arguments) stopped the launch with jsonargparse's NSKeyError
    for its `__path__` entry."""
    (tmp_path / "trainer.yaml").write_text("max_steps: 2\nmax_time: '00:01:00:00'\n")
    exp = fit(tmp_path, f"--trainer={tmp_path / 'trainer.yaml'}")
    assert run_file(exp)["model"]["config"]["max_steps"] == 2
    assert run_file(exp)["trainer"] == {"max_time": "00:01:00:00"}
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def batches_trained(exp: Path) -> int:
    loops = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["loops"]["fit_loop"]
    return loops["epoch_loop.batch_progress"]["total"]["completed"]


@pytest.mark.integration
def test_a_config_key_given_after_the_trainer_argument_that_sets_it_wins(tmp_path: Path) -> None:
    """`run.yaml max_steps=6` over a run file's `trainer: {max_steps: 4}`, and `fit --trainer.max_steps 4
    --model.config.max_steps 6`, trained 4 steps and recorded 4: the earlier Trainer argument won. The same for
    accumulate_grad_batches / batches_per_step."""
    (tmp_path / "run.yaml").write_text(
        "trainer:\n  max_steps: 4\n  accumulate_grad_batches: 2\n"
        "model:\n  config:\n    max_steps: 9\n    batches_per_step: 1\n    in_dim: 3\n"
    )
    BoringTask.launch(
        BoringConfig(run_dir=str(tmp_path / "runs")),
        argv=[str(tmp_path / "run.yaml"), "max_steps=6", "batches_per_step=3"],
    )
    short = tmp_path / "runs" / "boring_task" / "run_0"
    long = fit(
        tmp_path,
        "--model.config.in_dim=3",
        "--trainer.max_steps=4",
        "--model.config.max_steps=6",
        "--trainer.accumulate_grad_batches=2",
        "--model.config.batches_per_step=3",
    )
    for exp in (short, long):
        data = run_file(exp)
        assert data["model"]["config"]["max_steps"] == 6 and data["model"]["config"]["batches_per_step"] == 3
        assert data["trainer"] == {}  # The Trainer took the config's values: no Trainer argument of its own.
        assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
        assert batches_trained(exp) == 18
    # Given after the config key, the Trainer argument wins, for the Trainer and the config alike.
    later = fit(
        tmp_path,
        "--model.config.in_dim=3",
        "--model.config.max_steps=6",
        "--model.config.batches_per_step=3",
        "--trainer.max_steps=4",
        "--trainer.accumulate_grad_batches=2",
    )
    assert run_file(later)["model"]["config"]["max_steps"] == 4 and batches_trained(later) == 8


@pytest.mark.unit
@pytest.mark.parametrize(
    ("trainer", "config", "says"),
    [
        ("max_steps: 4", "max_steps: 9", "trainer.max_steps: 4 and model.config.max_steps: 9 both set max_steps"),
        (
            "accumulate_grad_batches: 2",
            "batches_per_step: 3",
            "trainer.accumulate_grad_batches: 2 and model.config.batches_per_step: 3 both set batches_per_step",
        ),
    ],
)
def test_a_file_giving_a_trainer_argument_and_its_config_key_apart_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trainer: str, config: str, says: str
) -> None:
    """One run file with `trainer: {max_steps: 4}` and `model: {config: {max_steps: 9}}` ran 4 steps: neither is
    given later, so which one wins cannot follow from the order; the same value in both is no conflict."""
    path = tmp_path / "run.yaml"
    path.write_text(f"trainer:\n  {trainer}\nmodel:\n  config:\n    {config}\n")
    for argv in ([str(path)], ["fit", "--config", str(path)]):
        with pytest.raises(mlfab.ConfigError) as info:
            BoringTask.launch(argv=[*argv, "--print_config"])
        assert str(info.value) == (
            f"{says}, and `--config {path}` gives both, so neither comes later to win: give only one of them, or "
            "the same value in both."
        )
    key, value = config.split(": ")
    path.write_text(f"trainer:\n  {trainer.split(':')[0]}: {value}\nmodel:\n  config:\n    {config}\n")
    assert printed_config(capsys, BoringTask, [str(path)])["model"]["config"][key] == int(value)
    # A key=value after the file is given later than both: it wins.
    path.write_text(f"trainer:\n  {trainer}\nmodel:\n  config:\n    {config}\n")
    assert printed_config(capsys, BoringTask, [str(path), f"{key}=5"])["model"]["config"][key] == 5


@pytest.mark.integration
def test_a_profiler_given_on_the_command_line_replaces_mlfabs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit(tmp_path, "--model.config.max_steps=3", "--model.config.in_dim=3", "--trainer.profiler=simple")
    assert "FIT Profiler Report" in caplog.text and "run_training_batch" in caplog.text


@pytest.mark.integration
def test_config_yaml_reruns_the_same_settings_in_both_forms(tmp_path: Path) -> None:
    first = fit(
        tmp_path,
        "--model.config.max_steps=2",
        "--model.config.learning_rate=0.01",
        "--model.config.in_dim=3",
        "--model.config.betas=[0.5,0.6]",
    )
    again = fit(tmp_path, "--config", str(first / "config.yaml"))
    assert run_file(again) == run_file(first)
    BoringTask.launch(argv=[str(first / "config.yaml")])
    (mlfab_form,) = {p for p in (tmp_path / "runs" / "boring_task").iterdir()} - {first, again}
    assert run_file(mlfab_form) == run_file(first)


@pytest.mark.integration
def test_trainer_args_from_a_config_file_are_kept(tmp_path: Path) -> None:
    first = fit(tmp_path, "--trainer.max_steps=2", "--trainer.max_time=00:01:00:00", "--trainer.gradient_clip_val=0")
    assert run_file(first)["trainer"] == {"max_time": "00:01:00:00"}  # The others are config values now.
    assert run_file(first)["model"]["config"]["clip_grad_norm"] is None
    again = fit(tmp_path, "--config", str(first / "config.yaml"))
    assert run_file(again) == run_file(first)
    assert torch.load(again / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    # A later key=value wins over the run file's value, for the config and the Trainer alike.
    BoringTask.launch(argv=[str(first / "config.yaml"), "max_steps=3"])
    (last,) = set((tmp_path / "runs" / "boring_task").iterdir()) - {first, again}
    assert torch.load(last / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.unit
def test_print_config_prints_the_run_file_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(BoringTask, ["fit", "--model.config.in_dim=3", "--trainer.max_time=00:00:01:00", "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"] == {"max_time": "00:00:01:00"}
    assert printed["model"]["config"]["in_dim"] == 3 and printed["model"]["config"]["batch_size"] == 8
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    with pytest.raises(SystemExit):
        run_cli(BoringTask, ["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == printed
    assert not (tmp_path / "work" / "runs").exists()  # Printing starts no run.
    # jsonargparse's options of the flag were dropped without a word (`skip_null` printed the nulls).
    refused = r"^--print_config=skip_null: mlfab's --print_config takes no options"
    with pytest.raises(mlfab.ConfigError, match=refused):
        run_cli(BoringTask, ["fit", "--print_config=skip_null"])
    with pytest.raises(mlfab.ConfigError, match=refused):
        BoringTask.launch(BoringConfig(), argv=["--print_config=skip_null"])  # The short form.


@pytest.mark.unit
@pytest.mark.parametrize("seed", [5, 0])  # 0 is a seed too (`0 == False` once dropped it).
def test_seed_everything_becomes_the_config_seed(capsys: pytest.CaptureFixture[str], seed: int) -> None:
    with pytest.raises(SystemExit):
        run_cli(BoringTask, ["fit", f"--seed_everything={seed}", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["config"]["seed"] == seed


@pytest.mark.unit
def test_unknown_key_in_the_script_config_is_reported() -> None:
    with pytest.raises(mlfab.ConfigError, match=r"unknown key 'bach_size'; did you mean 'batch_size'\?"):
        BoringTask.launch({"bach_size": 1}, argv=["fit", "--print_config"])


@pytest.mark.integration
def test_ckpt_path_keeps_the_checkpoint_config_except_what_is_given(tmp_path: Path) -> None:
    first = fit(tmp_path, "--model.config.max_steps=4", "--model.config.in_dim=3", "--model.config.learning_rate=0.01")
    ckpt = first / "checkpoints" / "last.ckpt"
    (tmp_path / "more.yaml").write_text("model:\n  config:\n    learning_rate: 0.02\n")
    more = str(tmp_path / "more.yaml")
    resumed = fit(tmp_path, f"--ckpt_path={ckpt}", "--model.config.max_steps=6", "--config", more)
    config = run_file(resumed)["model"]["config"]
    assert config["in_dim"] == 3  # From the checkpoint (the class default is 4).
    assert config["max_steps"] == 6  # Given on the command line: wins over the checkpoint's 4.
    assert config["learning_rate"] == 0.02  # Given in a --config file: wins over the checkpoint's 0.01.
    saved = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["config"]["learning_rate"] == 0.02


@pytest.mark.integration
def test_validate_and_test_run_the_task_phases(tmp_path: Path) -> None:
    phases: list[str] = []

    class NoTestSet(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> object:
            phases.append(phase)
            return None if phase == "test" else super().get_dataset(phase)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            phases.append(f"loss:{state.phase}")
            return super().get_loss(batch, state)

    root = tmp_path / "runs" / "no_test_set"
    assert run_cli(NoTestSet, ["validate", f"--model.config.run_dir={tmp_path / 'runs'}"]) == 0
    assert phases == ["valid", "loss:valid", "loss:valid"]  # valid_batches=2 of the endless validation set.
    phases.clear()
    assert run_cli(NoTestSet, ["test", f"--model.config.run_dir={tmp_path / 'runs'}"]) == 0
    assert phases == ["test", "valid", "loss:test", "loss:test"]  # No test set: the validation set, in phase test.
    assert sorted(p.name for p in root.iterdir()) == ["run_0", "run_1"]
    assert all((root / r / "config.yaml").is_file() for r in ("run_0", "run_1"))


@pytest.mark.unit
def test_fit_errors_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(BoringTask, ["fit", "--model.config.batch_size", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'Parser key "model.config.batch_size"' in err and "int" in err and "many" in err
    with pytest.raises(SystemExit):
        run_cli(BoringTask, ["fit", "--model.config.bach_size", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --model.config.bach_size 3" in err
    assert "did you mean --model.config.batch_size" in err
    with pytest.raises(SystemExit):  # A prefix of one flag is not that flag.
        run_cli(BoringTask, ["fit", "--model.config.batches", "4", "--trainer.max_step", "2"])
    assert "unrecognized arguments: --model.config.batches 4 --trainer.max_step 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(RequiredTask, ["fit"])
    assert "model.config.width" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The `mlfab` console script


@pytest.mark.unit
def test_console_script_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit"]) == 2
    assert "which task? Name it by import path: --model package.module.TaskClass" in capsys.readouterr().err
    assert main(["fit", "--model", "mlfab.testing.RegressionDataset"]) == 2
    assert "RegressionDataset is not an mlfab.Task subclass; tasks in mlfab.testing: BoringTask" in (
        capsys.readouterr().err
    )
    assert main(["fit", "--model", "no_such_module.Task"]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err
    assert main(["train", "--model", "mlfab.testing.BoringTask"]) == 2
    assert "unknown subcommand 'train'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "mlfab {fit,validate,test,predict}" in capsys.readouterr().out
    assert import_task("mlfab.testing:BoringTask") is BoringTask


@pytest.mark.unit
def test_console_script_help_shows_the_task_fields(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model=mlfab.testing.BoringTask", "--help"])
    assert "Samples per batch" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Every YAML config shipped in examples/ loads in both forms.


EXAMPLE_TASKS = {"digits": "examples.digits.DigitsClassification", "mnist": "examples.mnist.MnistClassification"}


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = import_task(EXAMPLE_TASKS[path.stem.split("_")[0]])  # <example>_<variant>.yaml
    config = resolve_config(task.config_class(), {"batch_size": 16}, config_file_args(task, path)[1])
    short = printed_config(capsys, task, ["batch_size=16", path.name])  # A bare name: found next to the task.
    with pytest.raises(SystemExit):
        run_cli(task, ["fit", "--model.config.batch_size=16", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == short
    assert resolve_config(task.config_class(), printed["model"]["config"]) == config


# ---------------------------------------------------------------------------------------------------------------------
# Real processes: the three commands a user types.

QUICK = {"max_steps": "2", "valid_batches": "1", "hidden_dim": "8"}


def run_example(tmp_path: Path, command: list[str]) -> None:
    env = {**os.environ, "RUN_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (exp,) = (tmp_path / "runs" / "digits_classification").iterdir()
    assert "Finished at step 2/2 after 0:0" in proc.stdout and f". Run directory: {exp}\n" in proc.stdout
    assert run_file(exp)["model"]["config"]["max_steps"] == 2


def flags() -> list[str]:
    return [part for key, value in QUICK.items() for part in (f"--model.config.{key}", value)]


@pytest.mark.integration
def test_subprocess_mlfab_form(tmp_path: Path) -> None:
    run_example(tmp_path, [sys.executable, "-m", "examples.digits", *(f"{k}={v}" for k, v in QUICK.items())])


@pytest.mark.integration
def test_subprocess_fit_form(tmp_path: Path) -> None:
    run_example(tmp_path, [sys.executable, "-m", "examples.digits", "fit", *flags()])


@pytest.mark.integration
def test_subprocess_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mlfab"
    if not script.is_file():
        pytest.skip("the mlfab console script is not installed in this environment")
    run_example(tmp_path, [str(script), "fit", "--model", "examples.digits.DigitsClassification", *flags()])


class Unannotated(BoringTask):
    def __init__(self, config):  # type: ignore[no-untyped-def]  # As many tasks are written.
        super().__init__(config)


class BaseAnnotated(BoringTask):
    def __init__(self, config: mlfab.Config) -> None:  # The base class: jsonargparse would see only its keys.
        super().__init__(config)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.parametrize("task", [Unannotated, BaseAnnotated])
def test_an_init_without_the_config_annotation_reads_the_declared_config(
    task: type, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = printed_config(capsys, task, ["in_dim=3", "max_steps=2"])
    assert printed["model"]["config"]["in_dim"] == 3  # A BoringConfig key, which mlfab.Config does not have.


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.default_root_dir=elsewhere"], r"--trainer.default_root_dir: a run keeps everything"),
        (["--trainer.enable_checkpointing=false"], r"--trainer.enable_checkpointing: mlfab writes last.ckpt"),
        (["--trainer.gradient_clip_algorithm=value"], r"gradient_clip_algorithm value needs --trainer.gradient_cl"),
        # Lightning clips nothing at 0 or below; a clip_grad_norm given with value clipping was set to null.
        (["--trainer.gradient_clip_algorithm=value", "--trainer.gradient_clip_val=0"], r"_val 0.0 with clipping by v"),
        (["--trainer.gradient_clip_algorithm=value", "--trainer.gradient_clip_val=-1"], r"_val -1.0 with clipping b"),
        (
            [
                "--trainer.gradient_clip_algorithm=value",
                "--trainer.gradient_clip_val=0.5",
                "--model.config.clip_grad_norm=2",
            ],
            r"clip_grad_norm 2.0 with --trainer.gradient_clip_algorithm value: a step is clipped by norm",
        ),
        (["--optimizer=SGD", "--optimizer.lr=0.1", "--model.config.learning_rate=0.5"], r"learning_rate with --opti"),
        (["--trainer.log_every_n_steps=1"], r"--trainer.log_every_n_steps: mlfab's loggers write every log_int"),
        (["--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"], r"--lr_scheduler without --optimizer: Lightning's"),
    ],
)
def test_arguments_mlfab_would_ignore_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    """Each was taken and then ignored or contradicted: the signal checkpoint went to default_root_dir while the run
    resumed from exp_dir; last.ckpt was written anyway; clip_grad_norm became a value clip; SGD never read
    learning_rate; mlfab's loggers never read log_every_n_steps. Refused before anything is written."""
    with pytest.raises(mlfab.ConfigError, match=message):
        fit(tmp_path, "--model.config.in_dim=3", "--model.config.max_steps=1", *args)
    assert not (tmp_path / "runs" / "boring_task").exists() or not any((tmp_path / "runs" / "boring_task").iterdir())


@dataclass(kw_only=True)
class DecayConfig(BoringConfig):
    learning_rate_decay: float = mlfab.field(1.0, help="A key of the task's own whose name starts like learning_rate")


class DecayTask(BoringTask, mlfab.Task[DecayConfig]):
    pass


@pytest.mark.integration
def test_a_key_named_like_an_optimizer_key_is_not_refused_with_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    """Only the config's own optimizer keys are refused with --optimizer, not a task's key that starts like one."""
    args = ["fit", "--optimizer=SGD", "--optimizer.lr=0.1", "--model.config.learning_rate_decay=0.5"]
    assert printed_config(capsys, DecayTask, args)["model"]["config"]["learning_rate_decay"] == 0.5


@pytest.mark.integration
def test_value_clipping_records_no_norm_clipping(tmp_path: Path) -> None:
    exp = fit(
        tmp_path,
        "--model.config.in_dim=3",
        "--model.config.max_steps=1",
        "--trainer.gradient_clip_algorithm=value",
        "--trainer.gradient_clip_val=0.5",
    )
    data = run_file(exp)
    assert data["model"]["config"]["clip_grad_norm"] is None
    assert data["trainer"] == {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flag", "says"),
    [
        (
            "--trainer.max_epochs=2",
            "--trainer.max_epochs needs a subcommand first, as in `{cmd} fit --trainer.max_epochs=2`",
        ),
        ("--model.config.max_steps=3", "give max_steps=3, or `{cmd} fit --model.config.max_steps=3`"),
        (
            "--max_steps",
            "(e.g. max_steps=... or `{cmd} fit --model.config.max_steps=...`): --model.config.max_steps and "
            "--trainer.max_steps need a subcommand first",
        ),
        ("--max_epochs=2", "(e.g. `{cmd} fit --trainer.max_epochs=2`): --trainer.max_epochs need"),
        ("--in_dim=3", "(e.g. in_dim=3 or `{cmd} fit --model.config.in_dim=3`): --model.config.in_dim need"),
        ("--launcher", "; the launcher is chosen in the script, as `launch(..., launcher='slurm')`."),
        ("-l", "; the launcher is chosen in the script, as `launch(..., launcher='slurm')`."),
        ("--bogus=1", "; 'bogus' is neither a config key nor a Trainer argument (see `{cmd} --help`)."),
    ],
)
def test_a_flag_in_the_short_form_is_refused_saying_what_to_type(flag: str, says: str) -> None:
    """`--trainer.max_epochs=2` was answered with `--model.config.trainer.max_epochs` and
    `--trainer.trainer.max_epochs`, neither of which exists; `--launcher` (mlfab 0.2's) with
    `--model.config.launcher` and `--trainer.launcher`, which do not exist either."""
    with pytest.raises(mlfab.ConfigError) as info:
        short_form_args(BoringTask, ["max_steps=4", flag])
    assert says.format(cmd=command_name()) in str(info.value)
    assert "trainer.trainer" not in str(info.value) and "config.trainer" not in str(info.value)


@pytest.mark.unit
def test_an_unknown_key_from_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    """The problem named the key alone: with several files, the user had to search them for it."""
    (tmp_path / "good.yaml").write_text("max_steps: 2\n")
    (tmp_path / "typo.yaml").write_text("max_stpes: 5\nmodel:\n  hiden: 3\n")
    with pytest.raises(mlfab.ConfigError) as info:
        NestedTask.launch(
            NestedConfig(), argv=[str(tmp_path / "good.yaml"), str(tmp_path / "typo.yaml"), "bach_size=3"]
        )
    problems = str(info.value).splitlines()
    assert f"  - unknown key 'max_stpes'; did you mean 'max_steps'? (in {tmp_path / 'typo.yaml'})" in problems
    assert f"  - unknown key 'model.hiden'; did you mean 'model.hidden'? (in {tmp_path / 'typo.yaml'})" in problems
    assert "  - unknown key 'bach_size'; did you mean 'batch_size'?" in problems  # Typed: no file.


@pytest.mark.unit
@pytest.mark.parametrize("form", ["--config", "--model.config", "--model.config="])
def test_an_unknown_key_in_a_yaml_file_of_fit_names_the_file_and_its_close_match(
    form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fit` said only "does not accept option 'model.config.bach_size'": which file, and what was meant, the user
    had to work out (the `key=value` form says both)."""
    body = "bach_size: 3\n" if form.startswith("--model.config") else "model:\n  config:\n    bach_size: 3\n"
    (tmp_path / "good.yaml").write_text("max_steps: 2\n" if form.startswith("--model.config") else "trainer: {}\n")
    (tmp_path / "typo.yaml").write_text(body)
    flag = form.rstrip("=")
    files = [
        f"{flag}={tmp_path / name}" if form.endswith("=") else f"{flag} {tmp_path / name}"
        for name in ("good.yaml", "typo.yaml")
    ]
    with pytest.raises(SystemExit) as info:
        run_cli(BoringTask, ["fit", *" ".join(files).split(" ")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"does not accept option 'model.config.bach_size' (in {tmp_path / 'typo.yaml'}); "
        "did you mean model.config.batch_size?" in err
    )
