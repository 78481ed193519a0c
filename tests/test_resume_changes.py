"""Relaunching a run with other settings: each config key is applied or refused, never recorded and ignored; a
refused relaunch leaves the run's files as they were; checkpoints are written only where an optimizer step ends."""

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration


class Recording(BoringTask):
    """Records, for each training step, the loss and the optimizer's hyperparameters."""

    seen: list[tuple[int, float, float, tuple[float, float], list[float]]] = []

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            groups = self.trainer.optimizers[0].param_groups
            decays = [g["weight_decay"] for g in groups]
            Recording.seen.append((state.num_steps, float(loss), groups[0]["lr"], tuple(groups[0]["betas"]), decays))
        return loss


def launch(exp: Path, **overrides: object) -> None:
    config = {"max_steps": 6, "valid_every_n_steps": None, "exp_dir": str(exp), **overrides}
    Recording.launch(BoringConfig(**config), argv=[])  # type: ignore[arg-type]


def snapshot(exp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(exp)): p.read_bytes() for p in sorted(exp.rglob("*")) if p.is_file()}


def test_where_the_run_lives_is_not_a_changed_setting(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A run started with `run_dir` records `exp_dir` unset; its relaunch names the run's directory. Every resume
    reported `exp_dir None -> '<run>'` as a changed setting (printed, and logged as resume/changed_settings)."""
    Recording.launch(BoringConfig(max_steps=6, valid_every_n_steps=None, run_dir=str(tmp_path)), argv=[])
    (exp,) = (tmp_path / "recording").iterdir()
    capfd.readouterr()
    Recording.launch(BoringConfig(max_steps=8, valid_every_n_steps=None, exp_dir=str(exp)), argv=[])
    out = capfd.readouterr().out
    assert "Resuming from" in out
    assert "Resumed with changed settings: max_steps 6 -> 8\n" in out


@pytest.mark.parametrize("form", ["key=value", "fit"])
def test_a_relaunch_into_a_run_keeps_the_runs_values_it_does_not_give(
    tmp_path: Path, capfd: pytest.CaptureFixture, form: str
) -> None:
    """`exp_dir=<run> max_steps=8` set every key it did not repeat back to the script's value (learning_rate 0.05,
    clip_grad_norm 10.0, valid_every_n_steps 10 here), as a changed setting; `fit --ckpt_path` kept the run's. The
    run's values kept over the script's are named."""
    exp = tmp_path / "run"
    first = ["max_steps=6", "learning_rate=0.02", "clip_grad_norm=2.0", "valid_every_n_steps=3", f"exp_dir={exp}"]
    script = BoringConfig(weight_decay=0.5)  # Away from its default: the script's value, in both launches.
    Recording.launch(script, argv=first)
    capfd.readouterr()
    short = ["max_steps=8", f"exp_dir={exp}"]  # The fit form's flag sets max_steps too: nothing of it is kept.
    Recording.launch(
        script, argv=short if form == "key=value" else ["fit", "--trainer.max_steps=8", f"--model.config.{short[1]}"]
    )
    out = capfd.readouterr().out
    assert "Resumed with changed settings: max_steps 6 -> 8\n" in out
    assert "Kept this run's learning_rate=0.02, clip_grad_norm=2.0, valid_every_n_steps=3: a relaunch" in out
    saved = yaml.safe_load((exp / "config.yaml").read_text())["model"]["config"]
    keys = ("max_steps", "learning_rate", "clip_grad_norm", "valid_every_n_steps", "weight_decay")
    assert [saved[k] for k in keys] == [8, 0.02, 2, 3, 0.5]


def test_changed_optimizer_settings_reach_the_restored_optimizer(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    Recording.seen = []
    launch(tmp_path / "same")
    launch(tmp_path / "same", max_steps=10)
    unchanged = {step: loss for step, loss, *_ in Recording.seen}
    Recording.seen = []
    launch(tmp_path / "run")
    capfd.readouterr()
    launch(tmp_path / "run", max_steps=10, learning_rate=0.5, betas=[0.5, 0.6], weight_decay=0.1)
    out = capfd.readouterr().out
    assert "Resumed with changed settings: learning_rate 0.05 -> 0.5, betas [0.9, 0.999] -> [0.5, 0.6]" in out
    assert "weight_decay 1e-05 -> 0.1, max_steps 6 -> 10" in out
    after = [(step, lr, betas, decays) for step, _, lr, betas, decays in Recording.seen if step >= 6]
    assert [step for step, *_ in after] == [6, 7, 8, 9]
    # The new values, in every group; weight decay only in the group of weight matrices (the bias's group has none).
    assert all(lr == 0.5 and betas == (0.5, 0.6) and decays == [0.1, 0.0] for _, lr, betas, decays in after)
    changed = {step: loss for step, loss, *_ in Recording.seen}
    assert all(changed[s] == unchanged[s] for s in range(7))  # The same run up to the relaunch...
    assert all(changed[s] != unchanged[s] for s in range(7, 10))  # ...and a different one after it.


@pytest.mark.parametrize(
    ("key", "value", "old"),
    [("seed", 7, 1337), ("batch_size", 4, 8), ("num_dataloader_workers", 2, 0)],
)
def test_a_change_the_resumed_run_cannot_apply_is_refused_and_the_run_is_untouched(
    tmp_path: Path, key: str, value: object, old: object
) -> None:
    exp = tmp_path / "run"
    launch(exp)
    before = snapshot(exp)
    with pytest.raises(mlfab.ConfigError) as info:
        launch(exp, max_steps=10, **{key: value})
    message = str(info.value)
    assert f"Cannot resume from {exp / 'checkpoints' / 'last.ckpt'} with these config changes" in message
    assert f"  - {key}: {old!r} -> {value!r} (" in message
    assert snapshot(exp) == before  # config.yaml, provenance and checkpoints as they were.


def test_a_max_steps_below_the_runs_step_is_refused_and_the_run_is_untouched(tmp_path: Path) -> None:
    """It ended at once ("Finished at step 6/3"), and config.yaml recorded max_steps 3 for a run at step 6."""
    exp = tmp_path / "run"
    launch(exp)
    before = snapshot(exp)
    with pytest.raises(mlfab.ConfigError) as info:
        launch(exp, max_steps=3)
    message = str(info.value)
    assert f"max_steps=3 is below step 6, which {exp / 'checkpoints' / 'last.ckpt'} is at" in message, message
    assert "Set max_steps=6 or more" in message, message
    assert snapshot(exp) == before
    launch(exp)  # max_steps=6 as before: a relaunch of the finished run, which trains nothing.


class StopsAt4(BoringTask):
    """SIGTERMs itself in its fourth step: it stops there, checkpointed, with no validation of step 4."""

    def on_step_start(self, state: mlfab.State) -> None:
        if state.num_steps == 3 and self.config.max_steps == 8:
            os.kill(os.getpid(), signal.SIGTERM)


def test_max_steps_lowered_to_the_runs_step_still_validates_the_final_model(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """The checkpoint, written for a longer run, owed no validation: the relaunch ended at once, with the final
    validation missing and the change of max_steps neither printed nor logged."""
    settings = {"valid_every_n_steps": 3, "save_every_n_seconds": None}
    StopsAt4.launch(BoringConfig(max_steps=4, exp_dir=str(tmp_path / "ref"), **settings), argv=[])  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as stopped:
        StopsAt4.launch(BoringConfig(max_steps=8, exp_dir=str(tmp_path / "run"), **settings), argv=[])  # type: ignore[arg-type]
    assert stopped.value.code == 128 + signal.SIGTERM
    capfd.readouterr()
    StopsAt4.launch(BoringConfig(max_steps=4, exp_dir=str(tmp_path / "run"), **settings), argv=[])  # type: ignore[arg-type]
    assert "Resumed with changed settings: max_steps 8 -> 4\n" in capfd.readouterr().out
    valid = {name: read_scalars(tmp_path / name / "tensorboard" / "valid")["loss/loss"] for name in ("ref", "run")}
    assert [step for step, _ in valid["ref"]] == [1, 3, 4]
    assert valid["run"] == valid["ref"]


def test_a_hardware_setting_that_starts_the_same_processes_resumes(tmp_path: Path) -> None:
    exp = tmp_path / "run"
    launch(exp)  # devices="auto": one process on this CPU machine.
    launch(exp, max_steps=10, devices=1)
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


class OwnOptimizer(BoringTask):
    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.config.learning_rate)


class OwnBuilder(BoringTask):
    """mlfab 0.2's way: the optimizer (and a scheduler, whose restored state would put the old rate back) from
    `get_optimizer_builder`."""

    def get_optimizer_builder(self) -> Any:
        def build(model: torch.nn.Module) -> Any:
            opt = torch.optim.Adam(model.parameters(), lr=self.config.learning_rate)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))

        return build


@pytest.mark.parametrize("task", [OwnOptimizer, OwnBuilder])
def test_an_optimizer_change_is_refused_when_the_task_builds_its_own(tmp_path: Path, task: type[BoringTask]) -> None:
    exp = tmp_path / "run"
    task.launch(BoringConfig(max_steps=4, exp_dir=str(exp)), argv=[])
    name = task.__name__
    with pytest.raises(mlfab.ConfigError, match=rf"learning_rate: 0.05 -> 0.5 \({name} builds its own optim"):
        task.launch(BoringConfig(max_steps=8, learning_rate=0.5, exp_dir=str(exp)), argv=[])


def test_checkpoints_are_written_only_where_an_optimizer_step_ends(tmp_path: Path) -> None:
    exp = tmp_path / "run"
    config = {"batches_per_step": 3, "save_every_n_steps": 2, "keep_last_n_checkpoints": 10}
    launch(exp, **config)
    launch(exp, **{**config, "max_steps": 10})
    names = sorted(p.name for p in (exp / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt"] + [f"step_{s:08d}.ckpt" for s in (2, 4, 6, 8, 10)]  # No `-v1` mid-step copies.
    for path in (exp / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        assert batches == 3 * ckpt["global_step"], path.name  # Every batch of every step, none of the next.


def test_a_launch_that_fails_before_it_starts_leaves_no_run_directory(tmp_path: Path) -> None:
    class NoData(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> object:
            raise FileNotFoundError("mnist/train-images-idx3-ubyte.gz")

    with pytest.raises(FileNotFoundError):
        NoData.launch(BoringConfig(run_dir=str(tmp_path)), argv=[])
    assert list((tmp_path / "no_data").iterdir()) == []


def test_a_launch_refused_before_the_trainer_exists_leaves_no_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused by Lightning's Trainer (a bad `--trainer.*` value), or a Slurm submission refused: the run
    directory the launch made goes with it, as for a launch that fails once it runs."""
    with pytest.raises(Exception, match="limit_train_batches"):  # (Not one mlfab holds to a config key's rule.)
        BoringTask.launch(BoringConfig(run_dir=str(tmp_path)), argv=["fit", "--trainer.limit_train_batches=-1.0"])
    assert list((tmp_path / "boring_task").iterdir()) == []
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mlfab.MlfabError, match="launcher=.slurm."):  # (pytest is no script the job can rerun)
        BoringTask.launch(BoringConfig(run_dir=str(tmp_path / "slurm")), argv=[], launcher="slurm")
    assert list((tmp_path / "slurm" / "boring_task").iterdir()) == []
    existing = tmp_path / "mine"
    (existing / "notes").mkdir(parents=True)
    with pytest.raises(mlfab.MlfabError, match="launcher=.slurm."):  # (pytest is no script the job can rerun)
        BoringTask.launch(BoringConfig(exp_dir=str(existing)), argv=[], launcher="slurm")
    assert [p.name for p in existing.iterdir()] == ["notes"]  # A directory the launch did not make stays.


def test_each_launch_keeps_its_settings_in_the_history(tmp_path: Path) -> None:
    import yaml

    exp = tmp_path / "run"
    launch(exp)
    launch(exp, max_steps=10, learning_rate=0.5)
    launches = yaml.safe_load((exp / "provenance" / "launches.yaml").read_text())
    records = [exp / "provenance" / entry["config_record"] for entry in launches]
    assert [yaml.safe_load(r.read_text())["model"]["config"]["learning_rate"] for r in records] == [0.05, 0.5]
    assert records[1].read_text() == (exp / "config.yaml").read_text()


def test_a_changed_learning_rate_reaches_old_and_new_parameter_groups_alike() -> None:
    """Groups saved before mlfab did the warmup itself hold schedule-free's `lr`; newer ones `base_lr` (their `lr` is
    recomputed from it at once: past the warmup nothing else sets it). One of each, in either order: each gets the
    new value under its own key."""
    from mlfab.resume import apply_optimizer_changes

    for old_first in (True, False):
        params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
        old, new = opt.param_groups if old_first else opt.param_groups[::-1]
        new.update(base_lr=0.1, linear_warmup_steps=0)
        apply_optimizer_changes([opt], {"learning_rate": (0.1, 0.5)})
        assert old["lr"] == 0.5 and "base_lr" not in old
        assert new["base_lr"] == 0.5 and new["lr"] == 0.5


def test_an_optimizer_change_is_refused_under_the_command_lines_optimizer(tmp_path: Path) -> None:
    """LightningCLI's `--optimizer` replaces `configure_optimizers` on the task instance: its optimizer never reads
    `learning_rate`, so a changed value cannot be applied on resume."""
    args = ["fit", "--optimizer=SGD", "--optimizer.lr=0.01", f"--model.config.exp_dir={tmp_path}"]
    BoringTask.launch(BoringConfig(max_steps=3), argv=args)
    with pytest.raises(mlfab.ConfigError, match=r"learning_rate: 0.05 -> 0.5 \(BoringTask builds its own optim"):
        BoringTask.launch(BoringConfig(max_steps=4, learning_rate=0.5), argv=args)  # Typed, it is refused sooner.


def test_a_changed_command_line_optimizer_or_scheduler_is_refused_on_resume(tmp_path: Path) -> None:
    """The restored optimizer and scheduler state hold every value they were built with (SGD's `lr`, StepLR's
    `step_size`): a relaunch that changes them would record the new values in config.yaml and train with the old."""
    args = ["fit", "--optimizer=SGD", "--optimizer.lr=0.01", f"--model.config.exp_dir={tmp_path}"]
    BoringTask.launch(BoringConfig(max_steps=3), argv=args)
    recorded = (tmp_path / "config.yaml").read_text()
    with pytest.raises(mlfab.ConfigError, match=r"--optimizer.lr: 0.01 -> 0.1 \(the restored optimizer and sch"):
        BoringTask.launch(BoringConfig(max_steps=4), argv=[*args, "--optimizer.lr=0.1"])
    scheduler = ["--lr_scheduler=StepLR", "--lr_scheduler.step_size=2"]
    with pytest.raises(mlfab.ConfigError, match=r"--lr_scheduler.class_path: None -> 'torch.optim.lr_sch"):
        BoringTask.launch(BoringConfig(max_steps=4), argv=[*args, *scheduler])
    assert (tmp_path / "config.yaml").read_text() == recorded
    BoringTask.launch(BoringConfig(max_steps=4), argv=args)  # The same arguments resume.
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_changed_batches_per_step_is_refused_on_resume(tmp_path: Path) -> None:
    """Lightning's restored batch count decides where each step ends: with 2 -> 3 the first resumed step took 2
    batches and was averaged over 3."""
    BoringTask.launch(BoringConfig(max_steps=4, batches_per_step=2, exp_dir=str(tmp_path)), argv=[])
    with pytest.raises(mlfab.ConfigError, match=r"batches_per_step: 2 -> 3 \(the restored batch count"):
        BoringTask.launch(BoringConfig(max_steps=8, batches_per_step=3, exp_dir=str(tmp_path)), argv=[])


class FixedOptimizer(BoringTask):
    """Its own optimizer, with settings of its own: it reads none of the default optimizer's keys."""

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01, betas=(0.5, 0.999))


def test_an_optimizer_key_the_tasks_own_optimizer_does_not_read_is_refused(tmp_path: Path) -> None:
    """`learning_rate=0.5` was recorded in config.yaml and ignored: the run trained at the task's own 0.01."""
    with pytest.raises(mlfab.ConfigError) as info:
        FixedOptimizer.launch(argv=["learning_rate=0.5", "betas=[0.1,0.2]", f"exp_dir={tmp_path / 'run'}"])
    message = str(info.value)
    assert message.startswith("learning_rate=0.5 (default 0.05), betas=(0.1, 0.2) (default (0.9, 0.999)): ")
    own = "FixedOptimizer builds its own optimizer (build_optimizer / get_optimizer_builder / configure_optimizers)"
    assert own in message
    assert "Read it there (self.config.learning_rate) or leave it at its default." in message
    assert not (tmp_path / "run").exists()  # Refused before the run started: no directory left behind.
    # Keys at their defaults (also typed out, as a YAML list), and keys the task reads, are fine.
    FixedOptimizer.launch(argv=["max_steps=2", "betas=[0.9,0.999]", f"exp_dir={tmp_path / 'ok'}"])
    OwnOptimizer.launch(argv=["max_steps=2", "learning_rate=0.5", f"exp_dir={tmp_path / 'reads'}"])


class LightningOptimizer(BoringTask):
    """Lightning's own hook, overridden: it builds an optimizer that reads no optimizer key."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class OptimizerMixin:
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)  # type: ignore[attr-defined]


class MixedIn(OptimizerMixin, BoringTask):
    pass


class CallsSuper(BoringTask):
    """Adds a scheduler to mlfab's default optimizer: the default optimizer reads the keys."""

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("task", [LightningOptimizer, MixedIn])
def test_an_optimizer_key_an_own_configure_optimizers_does_not_read_is_refused(task: type, tmp_path: Path) -> None:
    """`configure_optimizers` overridden (in the task, or a mixin before it) skipped the check: `learning_rate=0.5`
    was recorded in config.yaml and the run trained at 0.01."""
    with pytest.raises(mlfab.ConfigError) as info:
        task.launch(argv=["max_steps=2", "learning_rate=0.5", f"exp_dir={tmp_path / 'run'}"])
    assert str(info.value).startswith(
        f"learning_rate=0.5 (default 0.05): {task.__name__} builds its own optimizer (build_optimizer / "
        "get_optimizer_builder / configure_optimizers), which does not read this key while building it, and no "
        "parameter group of its optimizer holds the value"
    )
    assert not (tmp_path / "run").exists()
    task.launch(argv=["max_steps=2", f"exp_dir={tmp_path / 'ok'}"])  # At its default: nothing to refuse.


class RateReadInInit(BoringTask):
    """Reads the rate in `__init__`, as Lightning modules often do: not while the optimizer is built."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.lr = config.learning_rate

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    trained_at: float | None = None

    def on_train_end(self) -> None:
        (group,) = self.trainer.optimizers[0].param_groups
        type(self).trained_at = group["lr"]


def test_a_rate_read_in_init_and_passed_to_the_optimizer_is_not_refused(tmp_path: Path) -> None:
    """It was refused as "not read, so the run would not use the value", though the run used it."""
    RateReadInInit.launch(argv=["max_steps=2", "learning_rate=0.2", f"exp_dir={tmp_path / 'run'}"])
    assert RateReadInInit.trained_at == 0.2


def test_an_own_configure_optimizers_calling_super_is_checked_once_and_trains_at_the_rate_set(tmp_path: Path) -> None:
    CallsSuper.launch(argv=["max_steps=2", "learning_rate=0.5", "warmup_steps=0", f"exp_dir={tmp_path / 'run'}"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5
    assert len(saved["lr_schedulers"]) == 1


class DecaysInConfigure(BoringTask):
    """A per-step scheduler on mlfab's default optimizer, in an own `configure_optimizers`, in one of Lightning's
    forms."""

    form = "dict"

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        scheduler = {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5), "interval": "step"}
        if self.form == "lists":
            return [optimizer], [scheduler]
        both = {"optimizer": optimizer, "lr_scheduler": scheduler}
        return [both] if self.form == "list_of_dicts" else both


@pytest.mark.parametrize("form", ["dict", "lists", "list_of_dicts"])
def test_a_scheduler_added_in_configure_optimizers_sets_the_rate_and_is_refused_beside_warmup(
    tmp_path: Path, form: str
) -> None:
    """The default optimizer's warmup set the rate back after every step: the scheduler decayed it once, then never."""
    task = type("DecaysInConfigure", (DecaysInConfigure,), {"form": form})
    task.launch(argv=["max_steps=3", "learning_rate=0.5", "warmup_steps=0", f"exp_dir={tmp_path / 'a'}"])
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5 * 0.5**3
    with pytest.raises(mlfab.TaskDefinitionError, match=r"DecaysInConfigure returned a learning-rate scheduler"):
        task.launch(argv=["max_steps=3", "warmup_steps=2", f"exp_dir={tmp_path / 'b'}"])


class TwoOptimizers(BoringTask):
    """Lightning's manual optimization (a GAN's two optimizers), returned as a pair."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.automatic_optimization = False
        self.other = torch.nn.Linear(2, 2)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, _ = self.optimizers()  # type: ignore[misc]
        loss = self.get_loss(batch, self.state("train"))
        first.zero_grad()
        self.manual_backward(loss)
        first.step()


def test_two_optimizers_returned_as_a_pair_are_two_optimizers(tmp_path: Path) -> None:
    """The pair was read as mlfab 0.2's (optimizer, scheduler): Lightning failed on the second optimizer."""
    TwoOptimizers.launch(argv=["max_steps=2", "clip_grad_norm=null", f"exp_dir={tmp_path / 'run'}"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(saved["optimizer_states"]) == 2 and not saved["lr_schedulers"]


def test_a_task_that_hands_its_config_on_while_building_its_optimizer_is_not_refused(tmp_path: Path) -> None:
    """The config the optimizer is built from is still the task's config class (isinstance, dataclasses)."""
    import dataclasses

    class HandsOn(BoringTask):
        def build_optimizer(self) -> torch.optim.Optimizer:
            assert isinstance(self.config, BoringConfig)
            return torch.optim.SGD(self.parameters(), lr=dataclasses.asdict(self.config)["learning_rate"])

    HandsOn.launch(argv=["max_steps=2", "learning_rate=0.5", f"exp_dir={tmp_path / 'run'}"])
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0][
            "param_groups"
        ][0]["lr"]
        == 0.5
    )


def test_an_optimizer_key_whose_default_is_a_factory_is_compared_with_that_default() -> None:
    """A config class giving `betas` a `default_factory` has no plain default: every value read as changed."""
    import dataclasses

    from mlfab.optim import refuse_unread_optimizer_keys

    @dataclasses.dataclass
    class FactoryConfig(BoringConfig):
        betas: tuple[float, float] = dataclasses.field(default_factory=lambda: (0.5, 0.999))

    refuse_unread_optimizer_keys(FactoryConfig(betas=[0.5, 0.999]), set(), "FactoryTask")  # type: ignore[arg-type]
    with pytest.raises(mlfab.ConfigError, match=r"^betas=\(0\.1, 0\.2\) \(default \(0\.5, 0\.999\)\): FactoryTask"):
        refuse_unread_optimizer_keys(FactoryConfig(betas=(0.1, 0.2)), set(), "FactoryTask")


def test_a_warmup_shortened_past_the_step_gives_the_full_rate_at_once(tmp_path: Path) -> None:
    """The warmup is left alone once it is over: a relaunch that ends it (100 steps -> 2, at step 6) must set the
    full rate itself, not keep the restored warmup rate (0.05 * 7 / 100)."""
    Recording.seen = []
    launch(tmp_path / "run", warmup_steps=100)
    launch(tmp_path / "run", warmup_steps=2, max_steps=8)
    rates = {step: lr for step, _, lr, *_ in Recording.seen}
    assert rates[5] == pytest.approx(0.05 * 6 / 100) and [rates[6], rates[7]] == [0.05, 0.05]


def test_a_relaunch_into_a_run_that_leaves_out_its_trainer_arguments_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """The run's config is kept, its Trainer arguments cannot be: a run clipped by value went on unclipped (its
    `clip_grad_norm` null kept, its `--trainer.gradient_clip_*` dropped), without a word."""
    exp, script = tmp_path / "run", BoringConfig(valid_every_n_steps=None)
    clip = ["--trainer.gradient_clip_val=0.001", "--trainer.gradient_clip_algorithm=value"]
    Recording.launch(script, argv=["fit", f"--model.config.exp_dir={exp}", "--model.config.max_steps=2", *clip])
    before = snapshot(exp)
    with pytest.raises(mlfab.ConfigError, match=r"does not give: --trainer.gradient_clip_val 0.001, --trainer.gradi"):
        Recording.launch(script, argv=["fit", f"--model.config.exp_dir={exp}", "--trainer.max_steps=4"])
    assert snapshot(exp) == before
    capfd.readouterr()
    Recording.launch(script, argv=["fit", f"--config={exp / 'config.yaml'}", "--trainer.max_steps=4"])
    out = capfd.readouterr().out
    assert "Resumed with changed settings: max_steps 2 -> 4\n" in out and "Kept this run's" not in out
    assert yaml.safe_load((exp / "config.yaml").read_text())["trainer"]["gradient_clip_algorithm"] == "value"


def test_a_warmup_change_on_resume_takes_the_rate_back_from_a_callback() -> None:
    """A rate a callback set after the warmup is the callback's; a relaunch that changes `warmup_steps` was
    reported as applied and changed nothing."""
    from mlfab.optim import warm_up
    from mlfab.resume import apply_optimizer_changes

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    group = opt.param_groups[0]
    group.update(base_lr=0.1, linear_warmup_steps=2, k=2)
    warm_up([opt])  # The warmup's end: the full rate.
    group.update(k=3, lr=0.02)  # A callback's rate, kept after the next steps.
    warm_up([opt])
    group["k"] = 4
    warm_up([opt])
    assert group["lr"] == 0.02
    apply_optimizer_changes([opt], {"warmup_steps": (2, 8)})
    assert group["lr"] == pytest.approx(0.1 * 5 / 8)
    group["k"] = 5
    warm_up([opt])
    assert group["lr"] == pytest.approx(0.1 * 6 / 8)


class LowersTheRateAtStep3(Recording):
    """A callback of its own sets the rate to 0.001 before step 3 (the warmup of 2 steps is over)."""

    def configure_callbacks(self) -> list[Any]:
        class Lower(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if trainer.global_step == 3:
                    trainer.optimizers[0].param_groups[0]["lr"] = 0.001

        return [Lower()]


def test_a_relaunch_that_changes_the_rate_takes_it_back_from_a_callback(tmp_path: Path) -> None:
    """Stopped at step 5 under the callback's rate, the run relaunched with `learning_rate=0.2` kept training at
    0.001 (the new rate recorded in config.yaml and reported as applied)."""
    Recording.seen = []
    exp = tmp_path / "run"
    LowersTheRateAtStep3.launch(BoringConfig(warmup_steps=2, learning_rate=0.1, max_steps=5, exp_dir=str(exp)), argv=[])
    assert [round(lr, 6) for _, _, lr, _, _ in Recording.seen] == [0.05, 0.1, 0.1, 0.001, 0.001]
    Recording.seen = []
    LowersTheRateAtStep3.launch(BoringConfig(warmup_steps=2, learning_rate=0.2, max_steps=8, exp_dir=str(exp)), argv=[])
    assert [(step, round(lr, 6)) for step, _, lr, _, _ in Recording.seen] == [(5, 0.2), (6, 0.2), (7, 0.2)]


class CountsValidation(BoringTask):
    batches = 0

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        CountsValidation.batches += 1
        return super().validation_step(batch, batch_idx)


def test_an_evaluation_into_a_run_takes_the_scripts_values_away_from_the_defaults(tmp_path: Path) -> None:
    """As a fit into the run does: the checkpoint's valid_batches (3) replaced the script's launch() value (1)."""
    exp = tmp_path / "run"
    CountsValidation.launch(
        BoringConfig(valid_every_n_steps=None), argv=[f"exp_dir={exp}", "max_steps=2", "valid_batches=3"]
    )
    CountsValidation.batches = 0
    CountsValidation.launch(BoringConfig(valid_batches=1), argv=["validate", f"--model.config.exp_dir={exp}"])
    assert CountsValidation.batches == 1


@dataclass(kw_only=True)
class WithExtra(BoringConfig):
    extra: int = mlfab.field(1, help="A key a later version of the code drops")


class Older(mlfab.Task[WithExtra]):
    def __init__(self, config: WithExtra) -> None:
        super().__init__(config)
        self.layer = torch.nn.Linear(config.in_dim, 1)

    get_dataset, get_loss, forward = BoringTask.get_dataset, BoringTask.get_loss, BoringTask.forward


class OlderLater(mlfab.Task[BoringConfig]):
    """The same task in a later version of the code, whose Config has no `extra`."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.layer = torch.nn.Linear(config.in_dim, 1)

    get_dataset, get_loss, forward = BoringTask.get_dataset, BoringTask.get_loss, BoringTask.forward


OlderLater.__name__ = OlderLater.__qualname__ = "Older"


@pytest.mark.parametrize("form", ["key=value", "fit"])
def test_a_relaunch_into_a_run_whose_keys_the_config_no_longer_declares_is_refused(tmp_path: Path, form: str) -> None:
    """The run's config.yaml held `extra: 3`; relaunched by code whose Config has no `extra`, the run went on without
    it and the relaunch said nothing (a checkpoint's config with such a key is refused by the parser)."""
    exp = tmp_path / "run"
    Older.launch(WithExtra(max_steps=2, valid_every_n_steps=None), argv=["extra=3", f"exp_dir={exp}"])
    before = snapshot(exp)
    args = ["max_steps=4", f"exp_dir={exp}"] if form == "key=value" else ["fit", f"--model.config.exp_dir={exp}"]
    with pytest.raises(mlfab.ConfigError, match=r"holds keys BoringConfig does not declare \(unknown key 'extra'"):
        OlderLater.launch(BoringConfig(max_steps=4, valid_every_n_steps=None), argv=args)
    assert snapshot(exp) == before


@pytest.mark.parametrize("form", ["exp_dir", "fit", "test --ckpt_path"])
def test_a_run_of_another_task_is_refused_as_such(tmp_path: Path, form: str) -> None:
    """It was refused key by key, as if the Config had changed ("holds extra, which BoringConfig no longer declares
    ... delete it"), or with the parser's whole usage; the run's files untouched."""
    exp = tmp_path / "run"
    Older.launch(WithExtra(max_steps=2, valid_every_n_steps=None), argv=[f"exp_dir={exp}"])
    before = snapshot(exp)
    args = {
        "exp_dir": [f"exp_dir={exp}"],
        "fit": ["fit", f"--model.config.exp_dir={exp}"],
        "test --ckpt_path": ["test", f"--ckpt_path={exp / 'checkpoints' / 'last.ckpt'}"],
    }[form]
    with pytest.raises(mlfab.CheckpointError, match=r"is a run of Older, not of Recording: point it at a run of Reco"):
        Recording.launch(BoringConfig(max_steps=4, valid_every_n_steps=None), argv=args)
    assert snapshot(exp) == before


def test_a_typo_in_a_runs_config_yaml_is_named_with_the_key_it_is_close_to(tmp_path: Path) -> None:
    exp = tmp_path / "run"
    launch(exp, max_steps=2, learning_rate=0.02)
    path = exp / "config.yaml"
    path.write_text(path.read_text().replace("    learning_rate: 0.02\n", "    learning_rat: 0.02\n"))
    with pytest.raises(mlfab.ConfigError, match=r"\(unknown key 'learning_rat'; did you mean 'learning_rate'\?\)"):
        launch(exp, max_steps=4)


def test_a_run_of_the_same_task_class_moved_into_a_function_resumes(tmp_path: Path) -> None:
    """The run check compared the whole qualname: `make.<locals>.Older` was refused as another task."""
    exp = tmp_path / "run"
    Older.launch(WithExtra(max_steps=2, valid_every_n_steps=None), argv=[f"exp_dir={exp}"])

    def make() -> type[Older]:
        class Older(globals()["Older"]):  # type: ignore[misc,valid-type]
            pass

        return Older

    moved = make()
    assert moved.__qualname__.endswith("<locals>.Older")
    moved.launch(WithExtra(max_steps=4, valid_every_n_steps=None), argv=[f"exp_dir={exp}"])
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_settings_manual_optimization_cannot_apply_are_refused_by_their_config_keys(tmp_path: Path) -> None:
    """Lightning refused the default clip_grad_norm naming `Trainer(gradient_clip_val=10.0)`, an argument the user
    never gave; a warmup never advanced (the rate stayed at a hundredth of learning_rate, silently)."""
    with pytest.raises(mlfab.ConfigError) as e:
        TwoOptimizers.launch(argv=["max_steps=2", "batches_per_step=2", "warmup_steps=3", f"exp_dir={tmp_path / 'a'}"])
    problems = str(e.value).splitlines()
    assert "(automatic_optimization=False: its training_step steps the optimizers) (3 problem(s)):" in problems[0]
    assert problems[1].startswith("  - key 'clip_grad_norm' (or --trainer.gradient_clip_val): set it to null")
    assert problems[2].startswith("  - key 'batches_per_step': set it to 1")
    assert problems[3].startswith("  - key 'warmup_steps': set it to 0")
    assert not (tmp_path / "a").exists()  # Refused before the run started.


class DecaysEachEpoch(BoringTask):
    """An epoch-interval scheduler over BoringTask's endless dpshdl set."""

    def build_optimizer(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.config.learning_rate)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def test_a_scheduler_stepped_each_epoch_of_an_endless_set_is_refused(tmp_path: Path) -> None:
    """It never stepped: the rate stayed where it began, silently."""
    with pytest.raises(mlfab.ConfigError, match=r"StepLR steps once an epoch .* endless: it would never step"):
        DecaysEachEpoch.launch(argv=["max_steps=3", f"exp_dir={tmp_path / 'a'}"])
    assert not (tmp_path / "a" / "config.yaml").exists()  # Refused before the run started.


class PlateauEachStep(BoringTask):
    """ReduceLROnPlateau on the validation loss, stepped every step; SIGTERM to itself in its sixth step."""

    stop = True

    def build_optimizer(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.config.learning_rate)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "interval": "step", "monitor": "valid/loss/loss"},
        }

    def get_loss(self, batch: Any, state: mlfab.State) -> Any:
        if state.phase == "train" and state.num_steps == 5 and PlateauEachStep.stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().get_loss(batch, state)


def test_a_resume_at_a_step_to_validate_says_lightning_steps_a_plateau_scheduler_once_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning steps a plateau scheduler after the validation the resume runs first, which the uninterrupted run
    had stepped it for already: the rate halved once more, silently."""
    args = ["max_steps=12", "valid_every_n_steps=3", "save_every_n_seconds=null", f"exp_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit):
        PlateauEachStep.launch(argv=args)
    monkeypatch.setattr(PlateauEachStep, "stop", False)
    capsys.readouterr()
    PlateauEachStep.launch(argv=args)
    assert "This run resumes at step 6, which was to validate: after that validation Lightning steps " in (
        capsys.readouterr().err
    )


def test_a_scheduler_stepped_each_epoch_of_an_endless_set_cut_into_epochs_steps(tmp_path: Path) -> None:
    """With --trainer.limit_train_batches (a number of batches) an endless set has epochs: not refused."""
    argv = ["fit", "--model.config.max_steps=7", f"--model.config.exp_dir={tmp_path / 'run'}"]
    DecaysEachEpoch.launch(argv=[*argv, "--trainer.limit_train_batches=3"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5**2)  # Two epochs ended.


class TurnsManualInSetup(TwoOptimizers):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.automatic_optimization = True

    def setup(self, stage: str) -> None:
        self.automatic_optimization = False
        super().setup(stage)


def test_manual_optimization_turned_on_after_the_trainer_was_built_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(mlfab.ConfigError, match=r"key 'warmup_steps': set it to 0"):
        TurnsManualInSetup.launch(argv=["max_steps=2", "clip_grad_norm=null", "warmup_steps=3", f"exp_dir={tmp_path}"])
