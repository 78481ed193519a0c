"""The end of a run is always logged (#15): the last optimizer step reaches every logger whatever its cadence, the
final model is validated, and the terminal says where the run ended and where its results are."""

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars
from tests.test_loggers_wandb_json import finished_wandb_run, read_lines, wandb_history

pytestmark = pytest.mark.integration

HOURLY = 3600.0  # A cadence no test run reaches: only the first write and the forced ones happen.


class RarelyLogged(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(
            mlfab.StdoutLogger(log_interval_seconds=HOURLY),
            mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=HOURLY),
            mlfab.JsonLogger(self.exp_dir, log_interval_seconds=HOURLY),
            mlfab.WandbLogger(self.exp_dir, log_interval_seconds=HOURLY),
        )


def worse_every_validation(loss: Tensor, state: mlfab.State) -> Tensor:
    """The training loss, and a validation loss that grows with the steps trained (for EarlyStopping to stop on)."""
    return loss if state.phase == "train" else loss.detach() * 0 + state.num_steps


class WorseEveryTime(RarelyLogged):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        return worse_every_validation(super().get_loss(batch, state), state)


def written_steps(exp: Path) -> dict[str, dict[str, list[int]]]:
    """{logger: {phase: steps with loss/loss}} read back from TensorBoard's, the JSON and W&B's files."""
    lines = read_lines(exp / "json" / "log.jsonl")
    rows = wandb_history(finished_wandb_run(exp))
    phases = ("train", "valid")
    return {
        "tensorboard": {p: [s for s, _ in read_scalars(exp / "tensorboard" / p)["loss/loss"]] for p in phases},
        "json": {p: [x["step"] for x in lines if x["phase"] == p and "loss/loss" in x["scalars"]] for p in phases},
        "wandb": {p: [r["trainer/global_step"] for r in rows if f"{p}/loss/loss" in r] for p in phases},
    }


def test_the_last_step_and_a_final_validation_reach_every_logger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 12 steps, validation every 5: Lightning alone validates at 5 and 10 (mlfab adds step 1), never the final model.
    config = BoringConfig(max_steps=12, valid_every_n_steps=5, exp_dir=str(tmp_path / "run"))
    RarelyLogged.launch(config, argv=[])
    # Training: the first step, each step a validation follows, and the last one (steps count from 0).
    expected = {"train": [0, 4, 9, 11], "valid": [1, 5, 10, 12]}
    assert written_steps(tmp_path / "run") == {"tensorboard": expected, "json": expected, "wandb": expected}

    out = capsys.readouterr().out
    assert "[train] step 11/12" in out and "[valid] step 12/12" in out
    assert "Finished at step 12/12 after 0:00:" in out
    assert f"  last checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in out


class RarelyValidated(BoringTask):
    def set_loggers(self) -> None:
        every = {"train": HOURLY, "valid": HOURLY}
        self.add_logger(
            mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=every),
            mlfab.JsonLogger(self.exp_dir, log_interval_seconds=every),
            mlfab.WandbLogger(self.exp_dir, log_interval_seconds=every),
        )


def test_a_validation_interval_keeps_the_final_validation(tmp_path: Path) -> None:
    """A write interval for `valid` dropped the validation of the final model (the training step before it was
    written): the run's results ended at the first validation."""
    RarelyValidated.launch(BoringConfig(max_steps=12, valid_every_n_steps=5, exp_dir=str(tmp_path / "run")), argv=[])
    expected = {"train": [0, 4, 9, 11], "valid": [1, 12]}  # The validations at 5 and 10 fall within the interval.
    assert written_steps(tmp_path / "run") == {"tensorboard": expected, "json": expected, "wandb": expected}


def early_stopping_args(exp: Path) -> list[str]:
    """A fit of 100 steps, validated every 5, that EarlyStopping ends after two worse validations."""
    return [
        "fit",
        f"--model.config.exp_dir={exp}",
        "--model.config.max_steps=100",
        "--model.config.valid_every_n_steps=5",
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=valid/loss/loss",
        "--trainer.callbacks.patience=2",
    ]


def test_early_stopping_ends_with_its_step_written_everywhere(tmp_path: Path) -> None:
    WorseEveryTime.launch(argv=early_stopping_args(tmp_path / "run"))
    expected = {"train": [0, 4, 9], "valid": [1, 5, 10]}  # Worse at 5 and 10: stopped after the validation at 10.
    assert written_steps(tmp_path / "run") == {"tensorboard": expected, "json": expected, "wandb": expected}


class WorseRarelyValidated(RarelyValidated):
    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        return worse_every_validation(super().get_loss(batch, state), state)


def test_early_stopping_with_a_validation_interval_writes_the_validation_it_stopped_on(tmp_path: Path) -> None:
    """EarlyStopping decides after the validation is flushed: with a `valid` write interval, the validation that
    ended training (and that its decision was made on) was dropped."""
    WorseRarelyValidated.launch(argv=early_stopping_args(tmp_path / "run"))
    expected = {"train": [0, 4, 9], "valid": [1, 10]}  # The validation at 5 falls within the interval.
    assert written_steps(tmp_path / "run") == {"tensorboard": expected, "json": expected, "wandb": expected}


@pytest.mark.parametrize("when", ["final checkpoint", "final validation"])
def test_a_signal_once_training_has_ended_stops_nothing_and_exits_0(
    tmp_path: Path, when: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM during the final checkpoint (here: in `on_training_end`) exited 143 although the run had finished
    at max_steps, so a requeue setup relaunched a finished run. During the final validation it said it was
    stopping after this step and saving a checkpoint, though nothing stopped."""

    class LateSignal(BoringTask):
        def on_training_end(self, state: mlfab.State) -> None:
            if when == "final checkpoint":
                os.kill(os.getpid(), signal.SIGTERM)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            if when == "final validation" and state.phase == "valid" and state.num_steps == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().get_loss(batch, state)

    LateSignal.launch(BoringConfig(max_steps=3, exp_dir=str(tmp_path)), argv=[])  # No SystemExit(143).
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    said = capsys.readouterr().err
    assert "SIGTERM: training has ended; its final validation and checkpoint finish." in said
    assert "stopping after this step" not in said


def test_a_signal_during_a_validation_stops_at_its_step_and_resumes_exactly(tmp_path: Path) -> None:
    """It acted one optimizer step later (the step after the validation ran first); the resumed run has the
    uninterrupted run's losses and validations."""
    losses: dict[int, float] = {}
    validated: list[int] = []

    class Recorded(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            if state.phase == "train":
                losses[state.num_steps] = float(loss)
            elif state.num_steps not in validated:
                validated.append(state.num_steps)
                if state.num_steps == 4 and self.config.run_dir == "signal" and len(validated) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
            return loss

    def launch(run_dir: str, exp: Path) -> None:
        config = BoringConfig(max_steps=8, valid_every_n_steps=2, run_dir=run_dir, exp_dir=str(exp))
        Recorded.launch(config, argv=[])

    launch("once", tmp_path / "once")
    expected, expected_valid = dict(losses), list(validated)
    losses.clear()
    validated.clear()
    with pytest.raises(SystemExit) as info:
        launch("signal", tmp_path / "signal")
    assert info.value.code == 143
    assert torch.load(tmp_path / "signal" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    launch("signal", tmp_path / "signal")
    assert losses == expected and validated == expected_valid == [1, 2, 4, 6, 8]
