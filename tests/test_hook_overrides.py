"""Lightning's hooks in a task work as in any LightningModule: an override need not call super() (Lightning's own
are empty), and mlfab's work in them (writing the logs, step bookkeeping, checkpoint state) still runs, once."""

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration


class Json(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0.0))


def lines(exp: Path, phase: str) -> list[tuple[int, dict[str, float]]]:
    records = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["scalars"]) for r in records if r["phase"] == phase]


def run(task_cls: type[BoringTask], exp: Path, **config: Any) -> None:
    settings = {"max_steps": 4, "valid_every_n_steps": 2, "diagnostics": [], "exp_dir": str(exp), **config}
    task_cls.launch(BoringConfig(**settings), argv=[])


@pytest.mark.parametrize("calls_super", [False, True])
def test_an_evaluation_end_override_logs_with_its_validation(tmp_path: Path, calls_super: bool) -> None:
    """Without super() no validation was written and callbacks saw no `valid/*` metric; with super() first, what the
    override logged after it was written with the next validation."""
    monitored: dict[int, list[str]] = {}

    class Monitor(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            monitored[trainer.global_step] = sorted(k for k in trainer.callback_metrics if k.startswith("valid"))

    class Overriding(Json):
        def configure_callbacks(self) -> list[pl.Callback]:
            return [Monitor()]

        def on_validation_epoch_end(self) -> None:
            if calls_super:
                super().on_validation_epoch_end()
            self.log_scalar("at_step", self.global_step)

    run(Overriding, tmp_path)
    valid = lines(tmp_path, "valid")
    assert [step for step, _ in valid] == [1, 2, 4]
    assert all(scalars["value/at_step"] == step and "loss/loss" in scalars for step, scalars in valid), valid
    assert monitored == {step: ["valid/loss/loss", "valid/value/at_step"] for step in (1, 2, 4)}


def test_a_train_batch_end_override_without_super_keeps_each_step(tmp_path: Path) -> None:
    """Without super() the steps were never written (one line of the whole run's mean, at a step that does not
    exist) and `on_step_end` was never called."""
    ended: list[int] = []

    class Overriding(Json):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.log_scalar("batch_idx", batch_idx)

        def on_step_end(self, state: mlfab.State, loss_dict: dict[str, torch.Tensor]) -> None:
            ended.append(state.num_steps)

    run(Overriding, tmp_path, valid_every_n_steps=None)
    train = lines(tmp_path, "train")
    assert [step for step, _ in train] == [0, 1, 2, 3] and ended == [1, 2, 3, 4]
    assert [scalars["value/batch_idx"] for _, scalars in train] == [0, 1, 2, 3]


def test_a_checkpoint_hook_override_without_super_keeps_mlfabs_state(tmp_path: Path) -> None:
    """mlfab's state in the checkpoint (counters, random states, the training weights) is saved and restored even
    when the task's own `on_save_checkpoint` / `on_load_checkpoint` do not call super()."""

    class Overriding(BoringTask):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["mine"] = self.global_step

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self.loaded_mine = checkpoint["mine"]

        def on_train_start(self) -> None:
            if hasattr(self, "loaded_mine"):  # Resumed: mlfab's counters were restored too.
                assert self.loaded_mine == 4 and self.state("train").num_samples == 4 * self.config.batch_size
                self.checked = True

    config = {"valid_every_n_steps": None, "diagnostics": [], "exp_dir": str(tmp_path)}
    Overriding.launch(BoringConfig(max_steps=4, **config), argv=[])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["mine"] == 4 and saved["mlfab"]["num_samples"] == 4 * BoringConfig.batch_size
    task = Overriding(BoringConfig(max_steps=6, **config))
    mlfab.run.trainer.build_trainer(task.config, tmp_path, []).fit(
        task, ckpt_path=tmp_path / "checkpoints" / "last.ckpt"
    )
    assert task.checked and task.state("train").num_samples == 6 * BoringConfig.batch_size


def test_an_evaluation_mode_switch_without_super_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(mlfab.TaskDefinitionError, match=r"Keeping.on_validation_model_eval does not call super\(\)"):

        class Keeping(BoringTask):
            def on_validation_model_eval(self) -> None:
                pass  # Dropout kept on, and (silently) the training weights evaluated.

    class Calling(BoringTask):  # Allowed: it calls super().
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()
            self.layer.train()

    assert Calling(BoringConfig())


def test_an_optimizer_step_or_clipping_override_without_super_is_refused() -> None:
    """Lightning's documented `optimizer_step` override (`optimizer.step(closure=...)`) kept the learning rate at its
    first warmup value for the whole run; a `configure_gradient_clipping` of one's own applied NaN steps."""
    with pytest.raises(
        mlfab.TaskDefinitionError, match=r"OwnStep.optimizer_step does not call super\(\).optimizer_step\(\): it warms"
    ):

        class OwnStep(BoringTask):
            def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any) -> None:
                optimizer.step(closure=optimizer_closure)

    with pytest.raises(mlfab.TaskDefinitionError, match=r"OwnClip.configure_gradient_clipping does not call super"):

        class OwnClip(BoringTask):
            def configure_gradient_clipping(
                self, optimizer: Any, gradient_clip_val: Any = None, algo: Any = None
            ) -> None:
                self.clip_gradients(optimizer, gradient_clip_val=1.0)


def test_an_optimizer_step_override_calling_super_warms_up(tmp_path: Path) -> None:
    rates: list[float] = []

    class Counting(BoringTask):
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any) -> None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            rates.append(optimizer.param_groups[0]["lr"])

    config = BoringConfig(max_steps=4, warmup_steps=4, learning_rate=0.1, exp_dir=str(tmp_path / "run"))
    Counting.launch(config, argv=[])
    assert rates == pytest.approx([0.05, 0.075, 0.1, 0.1])  # After each step, the next step's rate.


def test_a_hook_of_a_class_mixed_in_before_the_task_gets_mlfabs_work_too(tmp_path: Path) -> None:
    class Mixin:
        def on_validation_epoch_end(self) -> None:
            self.log_scalar("from_mixin", 1.0)  # type: ignore[attr-defined]

    class Mixed(Mixin, Json):  # type: ignore[misc]
        pass

    run(Mixed, tmp_path)
    assert [(step, scalars["value/from_mixin"]) for step, scalars in lines(tmp_path, "valid")] == [
        (1, 1.0),
        (2, 1.0),
        (4, 1.0),
    ]
