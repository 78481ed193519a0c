"""Validation cadence in optimizer steps when an epoch ends part-way through a gradient accumulation,
`valid_first_n_seconds` holding back every validation but the final one, and the final checkpoint's message on a
line of its own on a terminal."""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import mlfab
from mlfab._lightning import step_ends
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration


def valid_steps(exp: Path) -> list[int]:
    return [step for step, _ in read_scalars(exp / "tensorboard" / "valid")["loss/loss"]]


class FiveBatchEpochs(BoringTask):
    """A map-style training set of 5 batches of 8: with 2 batches a step, each epoch ends mid-accumulation."""

    batches: list[tuple[int, bool]] = []  # (global_step after the batch, whether mlfab saw a step end)
    validations: list[tuple[int, bool]] = []  # (global_step, whether the batch before ended a step)

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        if phase == "train":
            g = torch.Generator().manual_seed(0)
            return TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, generator=g))
        return super().get_dataset(phase)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        FiveBatchEpochs.batches.append((self.trainer.global_step, step_ends(self.trainer)))

    def on_validation_start(self) -> None:
        super().on_validation_start()
        FiveBatchEpochs.validations.append((self.trainer.global_step, step_ends(self.trainer)))


def test_validation_every_n_optimizer_steps_when_epochs_end_mid_accumulation(tmp_path: Path) -> None:
    FiveBatchEpochs.batches, FiveBatchEpochs.validations = [], []
    config = BoringConfig(max_steps=8, valid_every_n_steps=2, batches_per_step=2, exp_dir=str(tmp_path / "run"))
    FiveBatchEpochs.launch(config, argv=[])
    # Lightning steps the optimizer at an epoch's last batch (batches 2, 4, 5, 7, 9, 10, ...), and that is where
    # mlfab's step ends are: global_step grows at exactly those batches.
    steps = [step for step, _ in FiveBatchEpochs.batches]
    grew = [b > a for a, b in zip([0, *steps], steps, strict=False)]
    assert grew == [ends for _, ends in FiveBatchEpochs.batches]
    assert steps[:10] == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    # After the first step, then every 2 optimizer steps (Lightning's count of 4 batches gave 1, 2, 4, 7, 8), and
    # never in the middle of a step.
    assert valid_steps(tmp_path / "run") == [1, 2, 4, 6, 8]
    assert FiveBatchEpochs.validations == [(1, True), (2, True), (4, True), (6, True), (8, True)]


class GradientOfItsBatches(FiveBatchEpochs):
    """Compares each step's gradient with the gradient of one batch of all that step's samples."""

    ratios: list[tuple[int, float]] = []  # (batches in the step, applied gradient norm / one big batch's)

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        if state.phase == "train":
            self.seen = [*getattr(self, "seen", []), batch]
        return super().get_loss(batch, state)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        x, y = (torch.cat([b[i] for b in self.seen]) for i in (0, 1))
        wanted = torch.autograd.grad(super().get_loss((x, y), self.state("train")), self.layer.weight)[0]
        GradientOfItsBatches.ratios.append((len(self.seen), float(self.layer.weight.grad.norm() / wanted.norm())))
        self.seen = []


def test_a_step_an_epoch_ends_short_of_batches_gets_its_batches_whole_gradient(tmp_path: Path) -> None:
    """Batches 5, 10, ... end an epoch and a step alone: their gradient was applied at 1/3 (Lightning divides each
    batch's loss by batches_per_step), where `batches_per_step` promises the update of one batch of the step's."""
    GradientOfItsBatches.ratios = []
    config = BoringConfig(max_steps=4, batches_per_step=3, clip_grad_norm=None, exp_dir=str(tmp_path / "run"))
    GradientOfItsBatches.launch(config, argv=[])
    assert [n for n, _ in GradientOfItsBatches.ratios] == [3, 2, 3, 2]
    assert [r for _, r in GradientOfItsBatches.ratios] == pytest.approx([1.0] * 4, rel=1e-4)


class FirstSamples(torch.utils.data.IterableDataset):
    """The first `n` of FiveBatchEpochs' samples, as a finite iterable (its last batch is kept, short)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)

    def __iter__(self) -> Any:
        return iter(zip(self.x, self.y, strict=True))


class IterableGradients(GradientOfItsBatches):
    samples = 20
    step_losses: list[tuple[float, float]] = []  # (on_step_end's loss, the loss of one batch of the step's samples)

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return FirstSamples(IterableGradients.samples) if phase == "train" else super().get_dataset(phase)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        x, y = (torch.cat([b[i] for b in self.seen]) for i in (0, 1))
        self.whole_loss = float(BoringTask.get_loss(self, (x, y), self.state("train")))
        super().on_before_optimizer_step(optimizer)

    def on_step_end(self, state: mlfab.State, loss_dict: dict[str, torch.Tensor]) -> None:
        IterableGradients.step_losses.append((float(loss_dict["loss"]), self.whole_loss))


@pytest.mark.parametrize(
    ("samples", "sizes"), [(20, [[8, 8], [4]]), (28, [[8, 8], [8, 4]]), (36, [[8, 8], [8, 8], [4]])]
)
def test_each_step_of_a_finite_iterable_gets_the_gradient_of_all_its_samples(
    tmp_path: Path, samples: int, sizes: list[list[int]]
) -> None:
    """An iterable's epoch may end in a step short of batches (it was applied at 1/2) or with a short batch (it
    counted as a whole one: the mean of the batches' means, not of their samples)."""
    GradientOfItsBatches.ratios, IterableGradients.samples, IterableGradients.step_losses = [], samples, []
    config = BoringConfig(
        max_steps=2 * len(sizes), batch_size=8, batches_per_step=2, clip_grad_norm=None, exp_dir=str(tmp_path / "run")
    )
    IterableGradients.launch(config, argv=[])
    assert [n for n, _ in GradientOfItsBatches.ratios] == [len(step) for step in sizes] * 2
    assert [r for _, r in GradientOfItsBatches.ratios] == pytest.approx([1.0] * 2 * len(sizes), rel=1e-4)
    # on_step_end gets the step's mean loss over its samples, as logged (it got the mean of the batches' means).
    got, wanted = zip(*IterableGradients.step_losses, strict=True)
    assert len(got) == 2 * len(sizes) and got == pytest.approx(wanted, rel=1e-5)


def test_an_explicit_trainer_val_check_interval_is_lightnings_batch_count(tmp_path: Path) -> None:
    argv = ["fit", "--model.config.max_steps=7", "--model.config.valid_every_n_steps=2"]
    argv.append("--trainer.val_check_interval=3")  # Lightning's meaning: every 3 training batches.
    BoringTask.launch(BoringConfig(exp_dir=str(tmp_path / "run")), argv=argv)
    assert valid_steps(tmp_path / "run") == [1, 3, 6, 7]  # The first step, every 3 batches, the final model.


def test_valid_first_n_seconds_holds_back_the_step_cadence_across_relaunches(tmp_path: Path) -> None:
    exp = tmp_path / "run"
    hour = 3600.0
    for max_steps in (6, 12):
        config = BoringConfig(max_steps=max_steps, valid_every_n_steps=4, valid_first_n_seconds=hour, exp_dir=str(exp))
        BoringTask.launch(config, argv=[])
    # No validation in the first hour of training but the final model's at the end of each launch.
    assert valid_steps(exp) == [6, 12]


def test_valid_first_n_seconds_then_the_step_cadence(tmp_path: Path) -> None:
    config = BoringConfig(max_steps=12, valid_every_n_steps=4, valid_first_n_seconds=1e-9, exp_dir=str(tmp_path))
    BoringTask.launch(config, argv=[])
    assert valid_steps(tmp_path) == [1, 4, 8, 12]  # Once the seconds have passed: the first step end, the cadence.


class OnATerminal(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.StdoutLogger(tty=True, log_interval_seconds=0.0))  # Writes to sys.stdout as captured.


def test_saved_checkpoint_is_printed_on_a_line_of_its_own_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    OnATerminal.launch(BoringConfig(max_steps=3, valid_batches=0, exp_dir=str(tmp_path)), argv=[])
    out = capsys.readouterr().out
    assert "\r\033[K[train] step 2/3" in out  # The live line was drawn, and nothing ended it since.
    assert f"\nSaved checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'}\n" in out
    assert "\n\n" not in out.split("Saved checkpoint", 1)[1]  # Ended once, not again by the logger's finalize.


class HalfPrecisionLoss(BoringTask):
    def get_loss(self, batch: Any, state: mlfab.State) -> torch.Tensor:
        return (super().get_loss(batch, state) * 0 + 30000.0).half()  # Finite in float16 (its largest is 65504).


def test_a_finite_half_precision_loss_is_not_taken_for_a_non_finite_one_under_batches_per_step(tmp_path: Path) -> None:
    """The step's losses were summed (weighted by samples) in float16: 30000 x 8 samples is inf, and every step was
    skipped as non-finite."""
    config = BoringConfig(max_steps=2, batch_size=8, batches_per_step=2, valid_batches=0, exp_dir=str(tmp_path))
    HalfPrecisionLoss.launch(config, argv=[])
    assert "nonfinite/skipped_steps" not in read_scalars(tmp_path / "tensorboard" / "train")
    assert [v for _, v in read_scalars(tmp_path / "tensorboard" / "train")["loss/loss"]] == [30000.0, 30000.0]


class EmptyEvaluation(BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return TensorDataset(torch.zeros(0, 4), torch.zeros(0)) if phase != "train" else super().get_dataset(phase)


def test_an_evaluation_set_with_no_samples_is_an_error_naming_it(tmp_path: Path) -> None:
    """Every validation was skipped with Lightning's generic warning: the run trained without a validation curve."""
    config = BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=3, valid_every_n_steps=1)
    with pytest.raises(mlfab.DatasetError, match=r"get_dataset\('valid'\) has no samples.*valid_batches=0"):
        EmptyEvaluation.launch(config, argv=[])
    EmptyEvaluation.launch(config, argv=["exp_dir=" + str(tmp_path / "none"), "valid_batches=0"])  # Said: fine.
    assert (tmp_path / "none" / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(mlfab.DatasetError, match=r"get_dataset\('test'\) has no samples"):
        EmptyEvaluation.launch(config, argv=["test", f"--model.config.exp_dir={tmp_path / 'none'}"])
