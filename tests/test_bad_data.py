"""Bad samples, bad batches, non-finite losses and empty datasets: skipped and counted, or a clear stop."""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor

import mlfab
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset, read_scalars

if TYPE_CHECKING:
    import lightning.pytorch as pl


class Flaky(RegressionDataset):
    """Every fifth sample fails to load; with `always`, every sample does."""

    def __init__(self, in_dim: int, always: bool = False) -> None:
        super().__init__(in_dim)
        self.calls = 0
        self.always = always

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.always or self.calls % 5 == 0:
            raise OSError(f"cannot read sample {self.calls}")
        return super().next()


class LateFlaky(Flaky):
    """Samples fail only from the 41st read on (after the first steps)."""

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls > 40 and self.calls % 5 == 0:
            raise OSError(f"cannot read sample {self.calls}")
        return RegressionDataset.next(self)


@pytest.mark.integration
def test_bad_samples_that_start_late_are_counted_by_the_last_step(tmp_path: Path) -> None:
    """Bad samples were looked for at a session's first step and every 50 steps: in a 12-step run whose samples
    began to fail after the first steps, `data/bad_samples` was never written."""

    class LateTask(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0))

        def get_dataset(self, phase: mlfab.Phase) -> Flaky:
            return LateFlaky(self.config.in_dim) if phase == "train" else super().get_dataset(phase)

    LateTask.launch(BoringConfig(max_steps=12, valid_every_n_steps=None, exp_dir=str(tmp_path)), argv=[])
    counted = read_scalars(tmp_path / "tensorboard" / "train")["data/bad_samples"]
    assert counted[-1][0] == 11 and counted[-1][1] >= 10  # The last step, with what failed (12 x 8 read, 1 in 5 bad).


@pytest.mark.integration
def test_bad_samples_are_skipped_and_training_goes_on(tmp_path: Path) -> None:
    seen: list[int] = []

    class FlakyTask(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0))

        def get_dataset(self, phase: mlfab.Phase) -> Flaky:
            return Flaky(self.config.in_dim)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            seen.append(len(batch[0]))
            return super().get_loss(batch, state)

    FlakyTask.launch(BoringConfig(max_steps=5, run_dir=str(tmp_path)), argv=[])
    assert seen[:5] == [8] * 5  # Full batches: the failed samples were replaced by good ones.
    (exp,) = (tmp_path / "flaky_task").iterdir()
    counted = read_scalars(exp / "tensorboard" / "train")["data/bad_samples"]
    # Batch 0 and the prefetched batch 1 took 19 reads, of which 3 failed; from then on the running count is in
    # every written step (6 batches read by the last step: 48 good samples, about 12 failed reads).
    assert counted[0] == (0, 3.0)
    assert [step for step, _ in counted] == [0, 1, 2, 3, 4]
    values = [v for _, v in counted]
    assert values == sorted(values) and values[-1] >= 10


@pytest.mark.integration
def test_a_dataset_that_keeps_failing_stops_with_its_name_and_errors(tmp_path: Path) -> None:
    class Broken(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Flaky:
            return Flaky(self.config.in_dim, always=True)

    with pytest.raises(mlfab.DatasetError) as info:
        Broken.launch(BoringConfig(max_steps=5, max_bad_samples_in_a_row=20, run_dir=str(tmp_path)), argv=[])
    message = str(info.value)
    assert "20 samples in a row from Flaky failed to load (max_bad_samples_in_a_row=20)" in message
    assert "OSError at " in message and "test_bad_data.py" in message
    assert "Last error: OSError: cannot read sample 20" in message


class FailsToCollate(RegressionDataset):
    """Its `fail_at`-th batch (from 1, counted in this dataset object) fails to collate."""

    def __init__(self, in_dim: int, fail_at: int) -> None:
        super().__init__(in_dim)
        self.fail_at, self.batches = fail_at, 0

    def collate(self, items: list) -> object:
        self.batches += 1
        if self.batches == self.fail_at:
            raise ValueError("ragged batch")
        return super().collate(items)


@pytest.mark.integration
def test_batches_that_fail_to_collate_are_skipped(tmp_path: Path) -> None:
    steps: list[tuple[str, int]] = []

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> FailsToCollate:
            return FailsToCollate(self.config.in_dim, fail_at=2)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            steps.append((state.phase, state.num_steps))
            return super().get_loss(batch, state)

    # Validation after the first step reads 3 batches; its second fails to collate, as training's second does. The
    # final validation (after step 4) reads 3 good ones.
    Task.launch(BoringConfig(max_steps=4, valid_batches=3, valid_every_n_steps=None, run_dir=str(tmp_path)), argv=[])
    assert [s for p, s in steps if p == "train"] == [0, 1, 2, 3]
    assert [p for p, _ in steps].count("valid") == 2 + 3
    (exp,) = (tmp_path / "task").iterdir()
    assert read_scalars(exp / "tensorboard" / "train")["data/skipped_batches"] == [(0, 1.0), (3, 1.0)]  # First, last


@pytest.mark.integration
def test_non_finite_loss_skips_the_step_and_is_logged(tmp_path: Path) -> None:
    weights: dict[int, Tensor] = {}

    class NaNAtTwo(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0))

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> dict[str, Tensor]:
            loss = super().get_loss(batch, state)
            if state.phase == "train":
                weights[state.num_steps] = self.layer.weight.detach().clone()
            bad = state.phase == "train" and state.num_steps == 2
            return {"mse": loss, "penalty": torch.tensor(float("nan")) if bad else torch.zeros(())}

    NaNAtTwo.launch(BoringConfig(max_steps=5, valid_every_n_steps=None, run_dir=str(tmp_path)), argv=[])
    assert torch.equal(weights[2], weights[3])  # Step 2 changed nothing.
    assert not torch.equal(weights[3], weights[4])  # Training went on.
    (exp,) = (tmp_path / "na_n_at_two").iterdir()
    skipped = read_scalars(exp / "tensorboard" / "train")["nonfinite/skipped_steps"]
    assert skipped[0] == (2, 1.0)


@pytest.mark.integration
def test_non_finite_steps_in_a_row_stop_the_run_and_keep_checkpoints(tmp_path: Path) -> None:
    class AlwaysNaN(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.TensorboardLogger(self.exp_dir), mlfab.JsonLogger(self.exp_dir))

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            return loss * float("nan") if state.num_steps >= 4 else loss

    config = BoringConfig(
        max_steps=50,
        max_nonfinite_steps_in_a_row=3,
        save_every_n_steps=2,
        save_every_n_seconds=None,
        run_dir=str(tmp_path),
    )
    with pytest.raises(
        mlfab.MlfabError,
        match=r"3 optimizer steps in a row had a non-finite loss 'loss' \(last at "
        r"step 6\); stopping \(max_nonfinite_steps_in_a_row\)",
    ):
        AlwaysNaN.launch(config, argv=[])
    (exp,) = (tmp_path / "always_na_n").iterdir()
    ckpt = exp / "checkpoints" / "step_00000004.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    # The step that stopped the run is written with its count (it was written without any: the run that died of
    # non-finite losses showed no skip at all in TensorBoard, its writes 2 s apart).
    assert read_scalars(exp / "tensorboard" / "train")["nonfinite/skipped_steps"][-1] == (6, 3.0)
    last = [line for line in map(json.loads, (exp / "json" / "log.jsonl").open()) if line["phase"] == "train"][-1]
    assert last["step"] == 6 and last["strings"]["nonfinite/last_skipped_step"] == "step 6: loss 'loss' not finite"


@pytest.mark.unit
@pytest.mark.parametrize("max_norm", [None, 10.0])
def test_the_finiteness_check_finds_each_bad_part_and_ignores_an_overflowing_sum(max_norm: float | None) -> None:
    from mlfab.nonfinite import NonFiniteGuard, SkipStep

    layer = torch.nn.Linear(3, 2)
    guard = NonFiniteGuard(max_in_a_row=None)

    def check(grad_value: float, **losses: float) -> str | None:
        layer.weight.grad = torch.full_like(layer.weight, grad_value)
        layer.bias.grad = torch.zeros_like(layer.bias)
        try:
            guard.clip_and_check(list(layer.parameters()), {k: torch.tensor(v) for k, v in losses.items()}, max_norm)
        except SkipStep:
            return guard.last_reason
        return None

    assert check(1.0, mse=0.5, aux=2.0) is None
    assert check(1.0, mse=0.5, aux=float("nan")) == "loss 'aux'"
    assert check(float("inf"), mse=0.5) == "the gradient"
    assert check(float("nan"), mse=0.5) == "the gradient"
    # Each part finite, their sum not (float32 overflows past 3.4e38): a huge step, but not a bad one.
    assert check(1.0, a=3e38, b=3e38) is None
    if max_norm is None:  # Two fp16 gradients of norm 60000 are finite; their sum is not, in fp16.
        half = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float16)) for _ in range(2)]
        for p in half:
            p.grad = torch.full_like(p, 60000.0)
        guard.in_a_row = 2  # As after two skipped steps: a good step starts the count again.
        try:
            guard.clip_and_check(half, {"loss": torch.tensor(1.0)}, None)
        except SkipStep:
            pytest.fail(f"finite fp16 gradients whose fp16 sum overflows were skipped as {guard.last_reason}")
        assert guard.in_a_row == 0  # Counted as a good step ...
        assert [p.grad.item() for p in half if p.grad is not None] == [60000.0, 60000.0]  # ... its gradients kept.
    # One fp16 gradient of finite entries whose norm (94862) is past fp16's 65504: skipped as "the gradient", or
    # (clipped) every entry zeroed; its norm is taken in float32.
    big = torch.nn.Parameter(torch.zeros(100_000, dtype=torch.float16))
    big.grad = torch.full_like(big, 300.0)
    guard.clip_and_check([big], {"loss": torch.tensor(1.0)}, max_norm)
    expected = 300.0 if max_norm is None else 300.0 * max_norm / (300.0 * 100_000**0.5)
    assert float(big.grad.float().mean()) == pytest.approx(expected, rel=1e-3)


def fp16_trainer(tmp_path: Path, scaler: torch.amp.GradScaler, clip: float | None) -> "pl.Trainer":
    """A Trainer with fp16 loss scaling, as on a GPU with precision="16-mixed" (on CPU only a given scaler does it)."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    return pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )


@pytest.mark.integration
def test_fp16_loss_scaling_skips_overflowing_steps_itself_with_clipping_on(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # The first steps' scaled gradients overflow.
    task = BoringTask(BoringConfig(max_steps=4, valid_every_n_steps=None))
    trainer = fp16_trainer(tmp_path, scaler, clip=10.0)
    trainer.fit(task)
    assert trainer.global_step == 4
    assert scaler.get_scale() < 2.0**127  # The scaler saw the overflow and backed off ...
    assert task.nonfinite_guard.total == 0  # ... and mlfab left those steps to it.


@pytest.mark.integration
def test_a_non_finite_loss_under_fp16_loss_scaling_is_skipped_and_training_goes_on(tmp_path: Path) -> None:
    class NaNAtOne(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            return loss * float("nan") if state.num_steps == 1 else loss

    task = NaNAtOne(BoringConfig(max_steps=4, valid_every_n_steps=None))
    trainer = fp16_trainer(tmp_path, torch.amp.GradScaler("cpu"), clip=None)
    trainer.fit(task)  # Failed with "unscale_() has already been called" when the skipped step left the scaler open.
    assert trainer.global_step == 4 and task.nonfinite_guard.total == 1


@pytest.mark.integration
def test_a_dataset_that_yields_nothing(tmp_path: Path) -> None:
    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204
            return iter(())

    class EmptyTask(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Empty:
            return Empty()

    with pytest.raises(mlfab.DatasetError, match=r"The training dataset \(Empty\) produced no batches"):
        EmptyTask.launch(BoringConfig(max_steps=5, run_dir=str(tmp_path)), argv=[])


@pytest.mark.integration
def test_a_training_set_smaller_than_one_batch_is_an_error(tmp_path: Path) -> None:
    class Tiny(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> object:
            return torch.utils.data.TensorDataset(torch.zeros(5, 4), torch.zeros(5))

    with pytest.raises(mlfab.DatasetError, match=r"get_dataset\('train'\) has 5 samples, fewer than one batch"):
        Tiny.launch(BoringConfig(batch_size=8, run_dir=str(tmp_path)), argv=[])
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())  # No empty run left behind.


@pytest.mark.integration
def test_a_skipped_batch_is_logged_from_its_step_and_after_a_resume(tmp_path: Path) -> None:
    class Task(BoringTask):
        def set_loggers(self) -> None:
            self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0))

        def get_dataset(self, phase: mlfab.Phase) -> FailsToCollate:
            return FailsToCollate(self.config.in_dim, fail_at=4)

    exp = tmp_path / "run"
    Task.launch(BoringConfig(max_steps=8, valid_batches=0, exp_dir=str(exp)), argv=[])
    Task.launch(BoringConfig(max_steps=12, valid_batches=0, exp_dir=str(exp)), argv=[])
    lines = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["scalars"].get("data/skipped_batches") for r in lines if r.get("phase") == "train"}
    # Written each step from the one that skipped it (a check every 50 steps missed it in a 12-step run), and on
    # from the first step after the resume.
    assert [skipped[s] for s in range(2)] == [None] * 2  # Batch 4 fails while step 2's batch is fetched.
    assert [skipped[s] for s in range(2, 9)] == [1.0] * 7  # Step 8: the first after the resume, its count carried.


@pytest.mark.integration
def test_value_clipping_keeps_the_finiteness_check(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    class NaNAtOne(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            return loss * float("nan") if state.phase == "train" and state.num_steps == 1 else loss

    task = NaNAtOne(BoringConfig(max_steps=3, valid_batches=0))
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task)
    assert task.nonfinite_guard.total == 1  # Step 1 skipped, as with norm clipping ...
    assert bool(torch.isfinite(task.layer.weight).all())  # ... instead of NaN weights.


@pytest.mark.integration
def test_a_non_finite_streak_and_count_carry_over_a_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class NaNFromOne(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            return loss * float("nan") if state.phase == "train" and state.num_steps >= 1 else loss

    settings: dict[str, Any] = {"max_nonfinite_steps_in_a_row": 3, "valid_batches": 0, "exp_dir": str(tmp_path)}
    NaNFromOne.launch(BoringConfig(max_steps=3, **settings), argv=[])  # Steps 1 and 2 skipped.
    # The uninterrupted run stops at step 3, the third in a row; so does the resumed one.
    with (
        caplog.at_level(logging.WARNING, logger="mlfab.nonfinite"),
        pytest.raises(mlfab.MlfabError, match=r"3 optimizer steps in a row had a non-finite loss .*\(last at step 3\)"),
    ):
        NaNFromOne.launch(BoringConfig(max_steps=10, **settings), argv=[])
    assert "Step 3 skipped: loss 'loss' is not finite (3 skipped so far)" in caplog.text


class InfGradient(BoringTask):
    """A finite loss whose gradient overflows at step 2, as a float16 backward can."""

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if state.phase == "train" and state.num_steps == 2:
            out.register_hook(lambda g: g * float("inf"))
        return torch.nn.functional.mse_loss(out.float(), y.float())


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["32-true", "16-true"])
def test_an_overflowing_gradient_is_skipped_without_loss_scaling(tmp_path: Path, precision: str) -> None:
    """16-true has no loss scaler; mlfab took any "16" precision for one and checked no gradient there: the inf
    gradient was applied (NaN weights)."""
    tasks: list[InfGradient] = []

    class Kept(InfGradient):
        def on_training_end(self, state: mlfab.State) -> None:
            tasks.append(self)

    config = BoringConfig(max_steps=4, valid_batches=0, precision=precision, exp_dir=str(tmp_path / "run"))
    Kept.launch(config, argv=[])
    assert tasks[0].nonfinite_guard.total == 1 and torch.isfinite(tasks[0].layer.weight).all()


class NanInAStepsFirstBatch(BoringTask):
    """A NaN loss part without a gradient in the first of step 1's two batches."""

    def get_loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: mlfab.State) -> dict[str, torch.Tensor]:
        self.batches = getattr(self, "batches", 0) + (state.phase == "train")
        bad = state.phase == "train" and self.batches == 3  # Step 1's first batch.
        return {"mse": super().get_loss(batch, state), "aux": torch.tensor(float("nan") if bad else 0.0)}


@pytest.mark.integration
def test_a_non_finite_loss_in_any_batch_of_an_accumulated_step_skips_it(tmp_path: Path) -> None:
    """Only the step's last batch's losses were checked: a NaN in an earlier batch went unnoticed."""
    tasks: list[NanInAStepsFirstBatch] = []

    class Kept(NanInAStepsFirstBatch):
        def on_training_end(self, state: mlfab.State) -> None:
            tasks.append(self)

    config = BoringConfig(max_steps=3, batches_per_step=2, valid_batches=0, exp_dir=str(tmp_path / "run"))
    Kept.launch(config, argv=[])
    assert tasks[0].nonfinite_guard.total == 1 and tasks[0].nonfinite_guard.last_skip == "step 1: loss 'aux' not finite"


@pytest.mark.integration
def test_a_non_finite_loss_in_any_batch_of_a_step_is_seen_under_an_accumulation_schedule(tmp_path: Path) -> None:
    """A GradientAccumulationScheduler sets the batches per step after the fit started: the step's losses were not
    kept, and the NaN in step 1's first batch was applied."""
    task = NanInAStepsFirstBatch(BoringConfig(max_steps=3, valid_every_n_steps=None, exp_dir=str(tmp_path)))
    schedule = pl.callbacks.GradientAccumulationScheduler({0: 2})
    trainer = pl.Trainer(max_steps=3, callbacks=[schedule], limit_val_batches=0, logger=False)
    trainer.fit(task)
    assert task.nonfinite_guard.total == 1 and task.nonfinite_guard.last_skip == "step 1: loss 'aux' not finite"
