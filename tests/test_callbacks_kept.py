"""`on_training_end(state)` runs once however training ends, also when it fails (mlfab 0.2's hook, which Lightning
only calls on a normal end: mlfab's `TrainingEndsOnError` callback does it on an exception), whatever the task's own
`configure_callbacks` returns, in a plain Trainer and through `launch`."""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from torch import Tensor

import mlfab
from mlfab.run.callbacks import TrainingEndsOnError
from mlfab.testing import BoringConfig, BoringTask
from tests.test_interop import trainer as plain_trainer

pytestmark = pytest.mark.integration


class Seen(Callback):
    """A callback of the task's own."""

    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True


class Ends(BoringTask):
    """Records `on_training_end`; fails in `get_loss` at step `fail_at` of phase `fail_in`, if given."""

    fail_in: str | None = None
    fail_at = 2

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.ended: list[int] = []
        self.own = Seen()

    def configure_callbacks(self) -> list[Any]:  # Its own, without calling super's.
        return [self.own]

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        if state.phase == self.fail_in and state.num_steps == self.fail_at:
            raise RuntimeError(f"boom in {state.phase}")
        return super().get_loss(batch, state)

    def on_training_end(self, state: mlfab.State) -> None:
        self.ended.append(state.num_steps)


def trainer(tmp_path: Path) -> pl.Trainer:
    return plain_trainer(tmp_path, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2)


@pytest.mark.parametrize("phase", ["train", "valid"])  # A validation within fit fails training too.
def test_on_training_end_runs_on_an_error_in_a_plain_trainer_despite_the_tasks_configure_callbacks(
    tmp_path: Path, phase: str
) -> None:
    class Failing(Ends):
        fail_in = phase

    task = Failing(BoringConfig())
    trainer_ = trainer(tmp_path)
    with pytest.raises(RuntimeError, match=f"boom in {phase}"):
        trainer_.fit(task)
    assert task.own.started  # The task's own callbacks are used ...
    assert task.ended == [2]  # ... and on_training_end ran, once, at the step that failed.
    assert sum(isinstance(c, TrainingEndsOnError) for c in trainer_.callbacks) == 1


def launch(task_cls: type[Ends], tmp_path: Path, error: type[BaseException], match: str) -> Ends:
    """Runs `task_cls` through `launch` (mlfab's Trainer, with its final checkpoint), which fails with `error`."""
    tasks: list[Ends] = []

    class Kept(task_cls):  # type: ignore[valid-type,misc]
        def on_train_start(self) -> None:
            tasks.append(self)
            super().on_train_start()

    with pytest.raises(error, match=match):
        Kept.launch(BoringConfig(max_steps=4, valid_every_n_steps=None, exp_dir=str(tmp_path / "run")), argv=[])
    (task,) = tasks
    return task


def test_on_training_end_runs_on_an_error_through_launch_despite_the_tasks_configure_callbacks(tmp_path: Path) -> None:
    class Failing(Ends):
        fail_in = "train"

    task = launch(Failing, tmp_path, RuntimeError, "boom in train")
    assert task.own.started and task.ended == [2]


def test_on_training_end_runs_once_when_training_ends_normally(tmp_path: Path) -> None:
    class Listed(Ends):  # Returns mlfab's callback itself too, as a task written for an older mlfab might.
        def configure_callbacks(self) -> list[Any]:
            return [self.own, TrainingEndsOnError()]

    for task in (Ends(BoringConfig()), Listed(BoringConfig())):
        trainer_ = trainer(tmp_path)
        trainer_.fit(task)
        assert task.ended == [4]
        assert isinstance(trainer_.callbacks[-1], TrainingEndsOnError)
        assert sum(isinstance(c, TrainingEndsOnError) for c in trainer_.callbacks) == 1


def test_on_training_end_runs_once_when_the_final_checkpoint_or_the_hook_itself_fails(tmp_path: Path) -> None:
    class FailingSave(Ends):
        def on_before_save_ckpt(self, ckpt_path: Path) -> None:
            if ckpt_path.name == "last.ckpt":  # Written by a callback when training ends.
                raise OSError("disk full")

    class FailingHook(Ends):
        def on_training_end(self, state: mlfab.State) -> None:
            super().on_training_end(state)
            raise RuntimeError("hook failed")

    assert launch(FailingSave, tmp_path / "save", OSError, "disk full").ended == [4]
    assert launch(FailingHook, tmp_path / "hook", RuntimeError, "hook failed").ended == [4]  # Not again for its error.
