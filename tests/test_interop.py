"""Lightning interop (#13): mlfab's scalars are Lightning metrics (`trainer.callback_metrics`, `logged_metrics`, what
`validate` / `test` return) under `<phase>/<namespace>/<key>`, sample-weighted like Lightning's own epoch-level
`self.log`, so EarlyStopping and ModelCheckpoint work on them, in a plain Trainer and through `Task.launch`; and
`validate(ckpt_path=...)` evaluates exactly the weights in the file, also in the Trainer that trained."""

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import Dataset

import mlfab
import mlfab.run.trainer
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration

BATCH = 8
NUM_VALID = 21  # 8 + 8 + 5: the last validation batch is partial.


class Samples(Dataset):
    """`n` fixed samples of y = x . w + noise (map-style: validation reads them in order, in every run alike)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        rng = np.random.default_rng((self.seed, i))
        x = rng.normal(size=4).astype(np.float32)
        return x, np.float32(x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32) + 0.1 * rng.normal())


class MapTask(BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> Samples:
        return Samples(64, 0) if phase == "train" else Samples(NUM_VALID, 1)

    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir))

    def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
        x, y = batch
        self.log_scalar("abs_error", lambda: (output - y).abs().mean())


class WithLightningsOwn(MapTask):
    """Also logs the loss the Lightning way, epoch-level, weighted by each batch's size."""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = super().validation_step(batch, batch_idx)
        self.log("lightning_loss", loss, batch_size=len(batch[0]))
        return loss


class WorseEveryTime(MapTask):
    """A validation loss that grows at every validation, so EarlyStopping has to stop."""

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        return loss if state.phase == "train" else loss.detach() * 0 + state.num_steps


def config(**kwargs: Any) -> BoringConfig:
    return BoringConfig(**{"batch_size": BATCH, "max_steps": 40, "valid_batches": 10, **kwargs})


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**settings, **kwargs})


def fit_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    settings = {"max_steps": 40, "val_check_interval": 5, "check_val_every_n_epoch": None, "enable_checkpointing": True}
    return trainer(tmp_path, callbacks=callbacks, **{**settings, **kwargs})


def fresh_validation_loss(tmp_path: Path, task_cls: type[MapTask], ckpt: str | Path) -> float:
    """The validation loss of a checkpoint's weights, from a Trainer and task that never trained."""
    (result,) = trainer(tmp_path / "fresh").validate(task_cls(config()), ckpt_path=str(ckpt), verbose=False)
    return float(result["valid/loss/loss"])


def json_lines(exp_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp_dir / "json" / "log.jsonl").read_text().splitlines()]


def test_validate_and_test_return_sample_weighted_means_as_lightning_metrics(tmp_path: Path) -> None:
    task = WithLightningsOwn(config())
    trainer_ = trainer(tmp_path, logger=mlfab.JsonLogger(tmp_path / "run"))
    (valid,) = trainer_.validate(task, verbose=False)

    # By hand, over the whole validation set: the mean over its 21 samples.
    samples = Samples(NUM_VALID, 1)
    x = torch.stack([torch.as_tensor(samples[i][0]) for i in range(NUM_VALID)])
    y = torch.tensor([samples[i][1] for i in range(NUM_VALID)])
    with torch.no_grad():
        loss, abs_error = F.mse_loss(task(x), y).item(), (task(x) - y).abs().mean().item()
        batch_means = [F.mse_loss(task(x[i : i + BATCH]), y[i : i + BATCH]).item() for i in range(0, NUM_VALID, BATCH)]
    assert abs(np.mean(batch_means) - loss) > 1e-3  # Averaging batch means would be measurably wrong here.

    assert set(valid) == {"valid/loss/loss", "valid/value/abs_error", "lightning_loss"}
    assert valid["valid/loss/loss"] == pytest.approx(loss, rel=1e-6)  # float32 sums
    assert valid["valid/value/abs_error"] == pytest.approx(abs_error, rel=1e-6)
    assert valid["valid/loss/loss"] == pytest.approx(valid["lightning_loss"], rel=1e-6)
    for metrics in (trainer_.callback_metrics, trainer_.logged_metrics):
        assert float(metrics["valid/loss/loss"]) == valid["valid/loss/loss"]

    # mlfab's logger got each number once, in its validation line, Lightning's own as Lightning reduced it.
    lines = json_lines(tmp_path / "run")
    (written,) = [line for line in lines if line["phase"] == "valid"]
    assert written["scalars"]["loss/loss"] == valid["valid/loss/loss"]
    assert written["scalars"]["lightning_loss"] == valid["lightning_loss"]
    assert [line["phase"] for line in lines if line["phase"] != "valid"] == ["hparams"]

    (test,) = trainer_.test(task, verbose=False)  # Tested on the validation set (BoringTask has no test set).
    assert test["test/loss/loss"] == valid["valid/loss/loss"]
    assert {"test/loss/loss", "test/value/abs_error"} <= set(test)


def test_training_values_are_metrics_at_the_steps_mlfab_resolves(tmp_path: Path) -> None:
    calls: list[int] = []

    class Lazy(MapTask):
        def log_train_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
            self.log_scalar("expensive", lambda: calls.append(state.num_steps) or float(state.num_steps))

    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer_ = fit_trainer(tmp_path, [], logger=csv, log_every_n_steps=4, max_steps=10)
    trainer_.fit(Lazy(config()))
    # Only the steps a logger writes: the first, Lightning's own every 4th (3, 7: where its `self.log` values go, so
    # both share the rows; mlfab wrote at 4 and 8), the step the validation at 5 follows, and the last.
    assert calls == [0, 3, 4, 7, 9]
    assert float(trainer_.callback_metrics["train/value/expensive"]) == 9.0
    assert "train/loss/loss" in trainer_.logged_metrics and "valid/loss/loss" in trainer_.callback_metrics

    # Each value reaches the CSV file once: from mlfab, not a second time through Lightning's `self.log` route.
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    valid_rows = [r for r in rows[1:] if r.split(",")[header.index("valid/loss/loss")]]
    assert len(valid_rows) == 2 and "epoch" not in header  # Validations after steps 5 and 10.


@pytest.mark.parametrize("stopped", [False, True])
def test_a_timed_logger_gets_the_step_each_validation_follows_in_a_plain_trainer(tmp_path: Path, stopped: bool) -> None:
    """Only a Trainer mlfab builds said which steps a validation follows: in one of the user's, a logger with a long
    write interval never got them, nor the last step before EarlyStopping ended training."""
    stop = [EarlyStopping(monitor="valid/loss/loss", stopping_threshold=100.0)] if stopped else []
    logger = mlfab.JsonLogger(tmp_path, log_interval_seconds=1000)
    fit_trainer(tmp_path, stop, max_steps=6, val_check_interval=2, logger=logger).fit(BoringTask(BoringConfig()))
    written = [(line["phase"], line["step"]) for line in json_lines(tmp_path) if line["phase"] in ("train", "valid")]
    if stopped:  # The first validation stops training: step 1 is the last trained.
        assert written == [("train", 0), ("train", 1), ("valid", 2)]
    else:
        expected = [("train", 0), ("train", 1), ("valid", 2), ("train", 3), ("valid", 4), ("train", 5), ("valid", 6)]
        assert written == expected


def test_early_stopping_on_valid_loss_in_a_plain_trainer(tmp_path: Path) -> None:
    stop = EarlyStopping(monitor="valid/loss/loss", patience=2)
    trainer_ = fit_trainer(tmp_path, [stop], max_steps=100)
    trainer_.fit(WorseEveryTime(config()))
    # Validations after steps 5 (the best), 10 and 15 (two without improvement: patience 2).
    assert trainer_.should_stop and trainer_.global_step == 15
    assert float(stop.best_score) == 5.0


def test_model_checkpoint_keeps_the_best_and_validate_best_evaluates_the_file(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="valid/loss/loss", save_top_k=2)
    task = MapTask(config())
    trainer_ = fit_trainer(tmp_path, [best])
    trainer_.fit(task)

    assert len(best.best_k_models) == 2
    assert sorted(best.best_k_models) == sorted(map(str, (tmp_path / "best").glob("*.ckpt")))
    assert min(float(v) for v in best.best_k_models.values()) == float(best.best_model_score)
    for path, score in best.best_k_models.items():  # Each file's score is the loss a fresh Trainer gets from it.
        assert fresh_validation_loss(tmp_path, MapTask, path) == pytest.approx(float(score), abs=1e-6)

    # In the Trainer that trained (its schedule-free optimizer still there): exactly the file's weights, again.
    (again,) = trainer_.validate(task, ckpt_path="best", verbose=False)
    assert again["valid/loss/loss"] == pytest.approx(float(best.best_model_score), abs=1e-6)
    (tested,) = trainer_.test(task, ckpt_path="best", verbose=False)
    assert tested["test/loss/loss"] == pytest.approx(float(best.best_model_score), abs=1e-6)


def test_validate_and_test_after_fit_evaluate_the_evaluation_weights(tmp_path: Path) -> None:
    """Without a checkpoint, validate and test after fit see what fit's own last validation saw."""
    task = MapTask(config())
    trainer_ = fit_trainer(tmp_path, [], max_steps=10)
    trainer_.fit(task)
    last = float(trainer_.callback_metrics["valid/loss/loss"])
    (valid,) = trainer_.validate(task, verbose=False)
    (test,) = trainer_.test(task, verbose=False)
    assert valid["valid/loss/loss"] == pytest.approx(last, abs=1e-6)
    assert test["test/loss/loss"] == pytest.approx(last, abs=1e-6)


def test_after_fit_the_task_holds_the_weights_its_validation_and_checkpoint_hold(tmp_path: Path) -> None:
    """The trained model is the schedule-free optimizer's evaluation weights: `task(x)` and a `test` in a new Trainer
    (Lightning's advice after a DDP fit) gave the training weights' numbers, unlike the run's own validation."""
    task = MapTask(config())
    trainer_ = fit_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_steps=10)
    trainer_.fit(task)
    last = float(trainer_.callback_metrics["valid/loss/loss"])
    (tested,) = trainer(tmp_path / "new").test(task, verbose=False)
    assert tested["test/loss/loss"] == pytest.approx(last, abs=1e-6)
    saved = MapTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    x = torch.randn(8, task.config.in_dim)
    with torch.no_grad():
        assert torch.allclose(task(x), saved(x), atol=1e-6)
    (valid,) = trainer_.validate(task, verbose=False)  # And an evaluation after fit leaves them so.
    assert valid["valid/loss/loss"] == pytest.approx(last, abs=1e-6)
    with torch.no_grad():
        assert torch.allclose(task(x), saved(x), atol=1e-6)


class RestoresWeightsAtTheEnd(pl.Callback):
    """Sets the weights when training ends, as StochasticWeightAveraging (its average) or a best-weights restore do."""

    weight = torch.full((1, 4), 0.25)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.task = pl_module
        with torch.no_grad():
            pl_module.layer.weight.copy_(self.weight)


@pytest.mark.parametrize("built_by", ["user", "mlfab"])
def test_weights_a_callback_sets_when_training_ends_are_the_ones_the_task_holds(tmp_path: Path, built_by: str) -> None:
    """Lightning runs the callbacks' `on_train_end` before the task's, whose switch to the evaluation weights then
    moved theirs (StochasticWeightAveraging's average was off by 0.03). mlfab's `last.ckpt` keeps the run's own
    weights, for an exact resume."""
    callback = RestoresWeightsAtTheEnd()
    task = MapTask(config(max_steps=6, valid_every_n_steps=None))
    if built_by == "user":
        fit_trainer(tmp_path, [callback], max_steps=6).fit(task)
    else:
        mlfab.run.trainer.build_trainer(task.config, tmp_path, loggers=[], extra_callbacks=[callback]).fit(task)
        saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["layer.weight"]
        assert not torch.equal(saved, callback.weight)
    assert torch.equal(task.layer.weight, callback.weight)
    (valid,) = fit_trainer(tmp_path / "new", []).validate(task, verbose=False)  # Evaluated as they are.
    samples = Samples(NUM_VALID, 1)
    x, y = (torch.tensor(np.stack(column)) for column in zip(*(samples[i] for i in range(NUM_VALID)), strict=True))
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(task(x), y)
    assert valid["valid/loss/loss"] == pytest.approx(float(expected), rel=1e-5)


class TwoValidationSets(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Samples(64, 0), batch_size=BATCH)

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [torch.utils.data.DataLoader(Samples(n, n), batch_size=BATCH) for n in (3, 5)]

    test_dataloader = val_dataloader


class TakesTheLoaderIndex(MapTask):
    """As Lightning's error for several loaders asks: a `dataloader_idx` argument."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return super().predict_step(batch, batch_idx)


class OwnSteps(MapTask):
    """Steps of its own (no super()) that log with mlfab: each loader's index, under one name or a name per loader;
    and Lightning's own `self.log` of each batch's error."""

    per_loader = False

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log_scalar(f"loader_{dataloader_idx}" if self.per_loader else "loader", float(dataloader_idx))
        self.log("error", (self(x) - y).abs().mean(), batch_size=len(y))

    test_step = validation_step

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        self.log_scalar(f"loader_{dataloader_idx}" if self.per_loader else "loader", float(dataloader_idx))
        return batch_idx


class OwnStepsNamePerLoader(OwnSteps):
    """Also Lightning's own reductions per loader (the step values and the epoch's max), and a value logged at the
    epoch's end (no loader's)."""

    per_loader = True

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        for value in (1.0, 5.0 + dataloader_idx):
            self.log("peak", value, on_step=True, on_epoch=True, reduce_fx="max")

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log("at_end", 7.0)

    on_test_epoch_end = on_validation_epoch_end


class TwoSets(TwoValidationSets):
    predict_dataloader = TwoValidationSets.val_dataloader


@pytest.mark.parametrize("run", ["validate", "test", "fit", "predict"])
def test_several_evaluation_loaders_are_refused_where_mlfab_would_average_them(tmp_path: Path, run: str) -> None:
    """Both loaders' results came out as the mean over their 8 samples, reported as each one's (`loader` 0.625 for
    both). Refused at the first batch of mlfab's own step, at the log call of a name logged from a second loader."""
    trainer_ = fit_trainer(tmp_path, [], max_steps=10)
    if run == "predict":  # mlfab's predict step logs nothing: each loader's predictions, as Lightning's.
        predictions = trainer_.predict(TakesTheLoaderIndex(config()), datamodule=TwoSets())
        assert [[len(p) for p in loader] for loader in predictions] == [[3], [5]]  # type: ignore[union-attr]
    else:
        step = "validation_step" if run != "test" else "test_step"
        with pytest.raises(mlfab.TaskDefinitionError, match=rf"2 dataloaders, and mlfab's {step} would average"):
            getattr(trainer_, run)(TakesTheLoaderIndex(config()), datamodule=TwoSets())
    phase = {"validate": "valid", "fit": "valid"}.get(run, run)
    with pytest.raises(
        mlfab.TaskDefinitionError, match=rf"value/loader was logged from dataloaders 0 and 1 of the {phase} "
    ):
        getattr(fit_trainer(tmp_path / "own", [], max_steps=10), run)(OwnSteps(config()), datamodule=TwoSets())


@pytest.mark.parametrize("run", ["validate", "test", "predict"])
def test_own_steps_over_several_loaders_keep_each_loaders_values_apart(tmp_path: Path, run: str) -> None:
    """A name per loader was refused with the rest; Lightning's `self.log` per-loader values were averaged into one
    value in mlfab's loggers (32.67 for 12.56 and 44.74)."""
    task, json_dir = OwnStepsNamePerLoader(config()), tmp_path / "json"
    trainer_ = fit_trainer(tmp_path, [], max_steps=10, logger=mlfab.JsonLogger(json_dir, log_interval_seconds=0))
    results = getattr(trainer_, run)(task, datamodule=TwoSets())
    (line,) = [line for line in json_lines(json_dir) if line.get("phase") == run.replace("validate", "valid")]
    assert line["scalars"]["value/loader_0"] == 0 and line["scalars"]["value/loader_1"] == 1
    if run == "predict":
        return
    for i, result in enumerate(results):  # Lightning's own per-loader values, written as they are by mlfab.
        name = f"error/dataloader_idx_{i}"
        assert line["scalars"][name] == pytest.approx(result[name], rel=1e-6)
        assert line["scalars"][f"peak/dataloader_idx_{i}"] == result[f"peak_epoch/dataloader_idx_{i}"] == 5 + i
    assert line["scalars"]["at_end"] == 7  # Not `at_end/dataloader_idx_1`, the last batch's loader.
    assert results[0]["error/dataloader_idx_0"] != pytest.approx(results[1]["error/dataloader_idx_1"])


def launch_args(tmp_path: Path, *callback: str) -> list[str]:
    return [
        "fit",
        f"--model.config.run_dir={tmp_path / 'runs'}",
        f"--model.config.batch_size={BATCH}",
        "--model.config.valid_every_n_steps=5",
        "--model.config.valid_batches=10",
        *callback,
    ]


def run_dir(tmp_path: Path, name: str) -> Path:
    (exp,) = (tmp_path / "runs" / name).iterdir()
    return exp


def test_launch_with_early_stopping_from_the_command_line(tmp_path: Path) -> None:
    args = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=valid/loss/loss"]
    WorseEveryTime.launch(
        argv=[*launch_args(tmp_path, *args, "--trainer.callbacks.patience=2"), "--model.config.max_steps=100"]
    )
    exp = run_dir(tmp_path, "worse_every_time")
    ckpt = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=False)
    # mlfab validates after the first step, then every 5: the best is step 1, then 5 and 10 are worse.
    assert ckpt["global_step"] == 10
    assert [line["step"] for line in json_lines(exp) if line["phase"] == "valid"] == [1, 5, 10]


def test_launch_with_model_checkpoint_from_the_command_line_keeps_the_two_best(tmp_path: Path) -> None:
    best_dir = tmp_path / "best"
    args = [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.monitor=valid/loss/loss",
        "--trainer.callbacks.save_top_k=2",
        f"--trainer.callbacks.dirpath={best_dir}",
    ]
    MapTask.launch(argv=[*launch_args(tmp_path, *args), "--model.config.max_steps=30"])
    exp = run_dir(tmp_path, "map_task")
    validations = {line["step"]: line["scalars"]["loss/loss"] for line in json_lines(exp) if line["phase"] == "valid"}
    assert len(validations) == 7  # Steps 1, 5, 10, ..., 30.

    states = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [s for key, s in states.items() if "valid/loss/loss" in key]
    kept = {path: float(score) for path, score in state["best_k_models"].items()}
    assert sorted(kept) == sorted(map(str, best_dir.glob("*.ckpt")))
    assert sorted(kept.values()) == pytest.approx(sorted(validations.values())[:2], abs=1e-12)
    assert float(state["best_model_score"]) == min(validations.values())
    for path, score in kept.items():
        assert fresh_validation_loss(tmp_path, MapTask, path) == pytest.approx(score, abs=1e-6)


def test_a_model_checkpoint_without_dirpath_saves_into_the_runs_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning put it under the first logger's name (`<run>/stdout/checkpoints/`), where `validate --ckpt_path`
    saw no run and started a new one."""
    args = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=valid/loss/loss"]
    MapTask.launch(argv=[*launch_args(tmp_path, *args), "--model.config.max_steps=10"])
    exp = run_dir(tmp_path, "map_task")
    (best,) = (exp / "checkpoints").glob("epoch=*.ckpt")
    assert not (exp / "stdout").exists()
    capsys.readouterr()
    MapTask.launch(argv=["validate", f"--ckpt_path={best}", f"--model.config.batch_size={BATCH}"])
    assert f"Run directory: {exp}" in capsys.readouterr().out


class SelfLogging(MapTask):
    """Logs with Lightning's `self.log` in `get_loss`: the step number, so each written value says where it belongs."""

    def set_loggers(self) -> None:
        self.add_logger(
            mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0.0),
            mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0.0),
        )

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        self.log(f"{state.phase}_step_seen", float(state.num_steps))
        return loss


def test_lightnings_self_log_lands_in_its_phase_and_step_unthinned_under_launch(tmp_path: Path) -> None:
    SelfLogging.launch(argv=[*launch_args(tmp_path), "--model.config.max_steps=12"])
    exp = run_dir(tmp_path, "self_logging")
    lines = json_lines(exp)
    train = {line["step"]: line["scalars"]["train_step_seen"] for line in lines if line["phase"] == "train"}
    # Every step, at its own step (Lightning's log_every_n_steps=50 would have kept step 0 only).
    assert train == {step: float(step) for step in range(12)}
    valid = [(line["step"], line["scalars"]["valid_step_seen"]) for line in lines if line["phase"] == "valid"]
    assert valid == [(1, 1.0), (5, 5.0), (10, 10.0), (12, 12.0)]  # The final model is validated too.
    assert all("valid_step_seen" not in line.get("scalars", {}) for line in lines if line["phase"] == "train")
    tensorboard = mlfab.testing.read_scalars(exp / "tensorboard" / "valid")
    assert tensorboard["valid_step_seen"] == valid
    assert "valid_step_seen" not in mlfab.testing.read_scalars(exp / "tensorboard" / "train")


class RecordingLosses(MapTask):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.losses: list[float] = []

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            self.losses.append(float(loss))
        return loss


class NativeWarmup(RecordingLosses):
    """Schedule-free AdamW warming up by itself, as mlfab's default optimizer did before."""

    def build_optimizer(self) -> torch.optim.Optimizer:
        from schedulefree import AdamWScheduleFree

        from mlfab.optim import param_groups

        c = self.config
        groups = param_groups(self, c.weight_decay)
        return AdamWScheduleFree(groups, lr=c.learning_rate, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps)


def test_learning_rate_monitor_and_mlfab_show_the_rate_applied_during_warmup(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    settings = config(learning_rate=0.1, warmup_steps=4, max_steps=6)
    torch.manual_seed(0)
    task = RecordingLosses(settings)
    csv, json_logger = CSVLogger(tmp_path / "csv"), mlfab.JsonLogger(tmp_path / "json", log_interval_seconds=0.0)
    fit = trainer(tmp_path, max_steps=6, limit_val_batches=0, logger=[csv, json_logger], log_every_n_steps=1)
    fit.callbacks.append(LearningRateMonitor(logging_interval="step"))
    fit.fit(task)

    expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    rows = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("lr-AdamWScheduleFree/pg1")
    monitored = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert monitored == pytest.approx(expected, rel=1e-12)
    lines = [line for line in json_lines(tmp_path / "json") if "optim/lr" in line.get("scalars", {})]
    assert [line["step"] for line in lines] == list(range(6))
    assert [line["scalars"]["optim/lr"] for line in lines] == pytest.approx(expected, rel=1e-12)

    # The same numbers as schedule-free AdamW's own warmup: the losses are equal bit for bit.
    torch.manual_seed(0)
    native = NativeWarmup(settings)
    trainer(tmp_path / "native", max_steps=6, limit_val_batches=0).fit(native)
    assert task.losses == native.losses and len(task.losses) == 6


def test_validate_test_and_predict_of_a_runs_checkpoint_go_into_that_run(tmp_path: Path) -> None:
    MapTask.launch(argv=[*launch_args(tmp_path), "--model.config.max_steps=10"])
    exp = run_dir(tmp_path, "map_task")
    ckpt = exp / "checkpoints" / "last.ckpt"
    config_yaml = (exp / "config.yaml").read_bytes()
    for subcommand in ("validate", "test", "predict"):
        MapTask.launch(argv=[subcommand, f"--ckpt_path={ckpt}"])

    assert [p.name for p in (tmp_path / "runs" / "map_task").iterdir()] == [exp.name]  # No run_1, run_2, ...
    assert (exp / "config.yaml").read_bytes() == config_yaml  # Still the training's.
    launches = yaml.safe_load((exp / "provenance" / "launches.yaml").read_text())
    assert [launch["subcommand"] for launch in launches] == ["fit", "validate", "test", "predict"]

    # Logged at the checkpoint's step, with the value a fresh Trainer computes from the file.
    lines = json_lines(exp)
    valid = [(line["step"], line["scalars"]["loss/loss"]) for line in lines if line["phase"] == "valid"]
    assert [step for step, _ in valid] == [1, 5, 10, 10]
    assert valid[-1][1] == pytest.approx(fresh_validation_loss(tmp_path, MapTask, ckpt), abs=1e-6)
    (test,) = [line for line in lines if line["phase"] == "test"]
    assert test["step"] == 10 and test["scalars"]["loss/loss"] == pytest.approx(valid[-1][1], abs=1e-6)

    # predict: the model's output for each batch's inputs, from the checkpoint's weights, in the run directory.
    saved = torch.load(exp / "predictions" / "step_00000010.pt", weights_only=False)
    model = MapTask.load_from_checkpoint(ckpt).eval()
    samples = Samples(NUM_VALID, 1)
    x = torch.stack([torch.as_tensor(samples[i][0]) for i in range(NUM_VALID)])
    with torch.no_grad():
        expected = model(x)
    assert [len(p) for p in saved["predictions"]] == [8, 8, 5]
    assert torch.allclose(torch.cat(saved["predictions"]), expected, atol=1e-6)
    assert saved["batch_indices"] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 21))]


def test_predict_without_a_checkpoint_and_in_a_plain_trainer(tmp_path: Path) -> None:
    MapTask.launch(
        argv=["predict", f"--model.config.run_dir={tmp_path / 'runs'}", f"--model.config.batch_size={BATCH}"]
    )
    exp = run_dir(tmp_path, "map_task")
    saved = torch.load(exp / "predictions" / "step_00000000.pt", weights_only=False)
    assert sum(len(p) for p in saved["predictions"]) == NUM_VALID

    # Lightning's own predict on the task's (x, y) batches: the model on x.
    task = MapTask(config())
    loader = torch.utils.data.DataLoader(Samples(NUM_VALID, 1), batch_size=BATCH)
    outputs = trainer(tmp_path).predict(task, dataloaders=loader)
    samples = Samples(NUM_VALID, 1)
    x = torch.stack([torch.as_tensor(samples[i][0]) for i in range(NUM_VALID)])
    with torch.no_grad():
        assert torch.allclose(torch.cat(outputs), task(x), atol=1e-6)  # type: ignore[arg-type]


class LossesToFile(MapTask):
    """Appends each training step's loss to `<exp_dir>/losses.txt`."""

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            with open(self.exp_dir / "losses.txt", "a") as f:
                f.write(f"{float(loss)!r}\n")
        return loss


def test_lightning_command_line_arguments_are_recorded_and_the_run_file_reproduces_the_run(tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    LossesToFile.launch(
        argv=[
            "fit",
            f"--model.config.exp_dir={first}",
            f"--model.config.batch_size={BATCH}",
            "--model.config.max_steps=6",
            "--optimizer=torch.optim.SGD",
            "--optimizer.lr=0.01",
            "--optimizer.momentum=0.9",
            "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size=2",
            "--seed_everything=7",
            "--trainer.gradient_clip_val=0.5",
        ]
    )
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert recorded["optimizer"]["class_path"] == "torch.optim.SGD" and recorded["optimizer"]["init_args"]["lr"] == 0.01
    assert recorded["lr_scheduler"]["init_args"]["step_size"] == 2
    assert recorded["model"]["config"]["seed"] == 7 and recorded["model"]["config"]["clip_grad_norm"] == 0.5

    LossesToFile.launch(argv=["fit", f"--config={first / 'config.yaml'}", f"--model.config.exp_dir={again}"])
    losses = (first / "losses.txt").read_text().splitlines()
    assert len(losses) == 6 and (again / "losses.txt").read_text().splitlines() == losses
    # The optimizer given was the one used: AdamW (mlfab's default) would give other losses.
    default = tmp_path / "default"
    LossesToFile.launch(
        argv=["fit", f"--model.config.exp_dir={default}", f"--model.config.batch_size={BATCH}", "--seed_everything=7"]
        + ["--model.config.max_steps=6"]
    )
    assert (default / "losses.txt").read_text().splitlines() != losses


def test_the_lightning_pipeline_example_runs(tmp_path: Path) -> None:
    from examples.lightning_pipeline import main

    accuracy = main(str(tmp_path), max_epochs=2, limit_train_batches=10, limit_val_batches=4)
    assert 0.0 <= accuracy <= 1.0
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"valid/loss/loss", "valid/value/accuracy", "train/loss/loss", "lr-AdamWScheduleFree/pg1"} <= set(header)
    assert len(list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))) == 2  # save_top_k=2


def test_config_keys_a_trainer_built_elsewhere_does_not_read_are_named(tmp_path: Path) -> None:
    """Trainer-level keys (max_steps, the cadences, async_checkpoints, ...) set in the config are read only by a Trainer
    mlfab builds; in a user's own Trainer they would do nothing, so mlfab says which, instead of ignoring them."""
    config = BoringConfig(max_steps=3, save_every_n_steps=2, async_checkpoints=False, learning_rate=0.01, seed=5)
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, max_steps=2).fit(BoringTask(config))
    said = [str(w.message) for w in caught if "only a Trainer built by mlfab" in str(w.message)]
    assert len(said) == 1
    assert "config sets max_steps=3, save_every_n_steps=2, async_checkpoints=False, which" in said[0]
    assert "learning_rate" not in said[0]  # The task reads that one itself.
    assert "valid_batches is the number of batches" not in said[0]
    # valid_batches: the batch count of an endless evaluation set in any Trainer, not of a finite one (the warning
    # told users to drop a key that set how many batches their validate ran).
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, max_steps=2).fit(BoringTask(BoringConfig(valid_batches=5)))
    (said_valid,) = [str(w.message) for w in caught if "only a Trainer built by mlfab" in str(w.message)]
    assert said_valid.endswith(
        "(valid_batches is the number of batches of an endless validation, test or predict set in any Trainer; of a "
        "finite one, Lightning's limit_*_batches decide.)"
    )

    with warnings.catch_warnings(record=True) as quiet:  # The config class's own defaults: nothing to say.
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2).fit(BoringTask(BoringConfig()))
        mlfab.run.trainer.build_trainer(config, tmp_path / "run", []).fit(
            BoringTask(config)
        )  # mlfab's: reads them all.
    assert not [w for w in quiet if "only a Trainer built by mlfab" in str(w.message)]


def test_data_keys_a_datamodule_does_not_read_are_named(tmp_path: Path) -> None:
    """With a LightningDataModule, batch_size=16 and 2 workers trained on its batches of 4 in this process, silently."""

    class Fours(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            x = torch.randn(8, 4)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(-1)), batch_size=4)

    config = BoringConfig(batch_size=16, num_dataloader_workers=2, max_steps=None)
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(BoringTask(config), datamodule=Fours())
    (said,) = [str(w.message) for w in caught if "mlfab's dataloaders read" in str(w.message)]
    assert said == (
        "BoringTask's config sets batch_size=16, num_dataloader_workers=2, which mlfab's dataloaders read; this fit "
        "takes its data from Fours, whose own dataloaders decide them: unless it reads them from the task's config, "
        "they do nothing here."
    )


def test_a_seed_no_one_seeded_with_is_named_in_any_trainer(tmp_path: Path) -> None:
    """`Task.launch` and the subcommands seed the global generators before building the task; a Trainer of the user's
    own, or `build_trainer`'s, never does: two seeds gave identical draws without a word."""
    config = BoringConfig(max_steps=2, seed=5)
    for fit in (trainer(tmp_path, max_steps=2).fit, mlfab.run.trainer.build_trainer(config, tmp_path / "run", []).fit):
        torch.manual_seed(0)
        with pytest.warns(UserWarning) as caught:
            fit(BoringTask(config))
        said = [str(w.message) for w in caught if "seed=5" in str(w.message)]
        assert said == [
            "BoringTask's config sets seed=5, but torch's generator was not seeded with it: Task.launch and the "
            "subcommands seed torch, numpy and random before building the task. With a Trainer of your own (or "
            "build_trainer's), call lightning.pytorch.seed_everything(5) first."
        ]
    with warnings.catch_warnings(record=True) as quiet:  # Seeded as said, or the class's default: nothing to say.
        warnings.simplefilter("always")
        pl.seed_everything(5, verbose=False)
        mlfab.run.trainer.build_trainer(config, tmp_path / "seeded", []).fit(BoringTask(config))
        torch.manual_seed(0)
        trainer(tmp_path, max_steps=2).fit(BoringTask(BoringConfig()))
    assert not [w for w in quiet if "seed" in str(w.message)]


def test_a_set_loggers_a_trainer_built_elsewhere_does_not_call_is_named(tmp_path: Path) -> None:
    """A task's `set_loggers` runs only in a run mlfab starts: in a user's own Trainer its loggers were silently not
    there (no JSON file, no warning)."""
    with pytest.warns(UserWarning) as caught:
        trainer(tmp_path, max_steps=2).fit(MapTask(config()))
    said = [str(w.message) for w in caught if "overrides set_loggers" in str(w.message)]
    assert said == [
        "MapTask overrides set_loggers, which only a run mlfab starts calls (Task.launch, the fit / validate / test / "
        "predict subcommands), so its loggers are not attached to this Trainer: pass them as its logger=[...] argument."
    ]
    with warnings.catch_warnings(record=True) as quiet:  # The default set_loggers, and a run mlfab starts.
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2).fit(BoringTask(config()))
        MapTask.launch(config(max_steps=2), argv=[f"exp_dir={tmp_path / 'run'}"])
    assert not [w for w in quiet if "overrides set_loggers" in str(w.message)]
    assert (tmp_path / "run" / "json" / "log.jsonl").is_file()


@pytest.mark.parametrize(
    "settings",
    [{}, {"save_every_n_steps": 5, "save_every_n_seconds": 60.0, "diagnostics": False, "async_checkpoints": True}],
)
def test_trainer_keys_are_exactly_the_keys_mlfab_trainer_reads(tmp_path: Path, settings: dict[str, Any]) -> None:
    """`TRAINER_KEYS` (what a user's own Trainer is warned it ignores) is written out by hand: a key the Trainer
    settings start to read and missing there would be ignored silently by a Trainer built elsewhere."""
    config = BoringConfig(**settings)
    fields = {f.name for f in dataclasses.fields(config)}
    read: set[str] = set()

    class Recording:
        def __getattr__(self, name: str) -> Any:
            read.add(name)
            return getattr(config, name)

    recorder: Any = Recording()
    mlfab.run.trainer.trainer_kwargs(recorder)
    mlfab.run.trainer.trainer_callbacks(recorder, tmp_path)
    mlfab.run.trainer.checkpoint_io(recorder)
    assert read & fields == set(mlfab.run.trainer.TRAINER_KEYS)


@pytest.mark.parametrize("phase", ["test", "val"])
@pytest.mark.parametrize(("limit", "expected"), [(None, 3), (1, 1), (2, 2)])
def test_an_endless_evaluation_set_runs_valid_batches_unless_a_limit_is_given(
    tmp_path: Path, phase: str, limit: int | None, expected: int
) -> None:
    """BoringTask's data has no end: `test` and `validate` run `valid_batches` batches of it, unless
    `limit_<phase>_batches` says how many (1 is one batch, not Lightning's unset 1.0, which never ended)."""
    seen: list[int] = []

    class Counting(BoringTask):
        def test_step(self, batch: Any, batch_idx: int) -> Any:
            return self.validation_step(batch, batch_idx)

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(batch_idx)
            assert len(seen) < 100, "an endless evaluation"
            return super().validation_step(batch, batch_idx)

    limits = {} if limit is None else {f"limit_{phase}_batches": limit}
    run = trainer(tmp_path, **limits)
    (run.test if phase == "test" else run.validate)(Counting(BoringConfig(valid_batches=3)))
    assert len(seen) == expected


def test_an_endless_test_set_with_validation_off_is_an_error_not_an_empty_test(tmp_path: Path) -> None:
    with pytest.raises(mlfab.ConfigError, match=r"The test dataset has no end and valid_batches is 0 .*limit_test_b"):
        trainer(tmp_path).test(BoringTask(BoringConfig(valid_batches=0)))


def test_predict_after_fit_uses_the_evaluation_weights_and_keeps_them(tmp_path: Path) -> None:
    """`trainer.predict(task)` after `trainer.fit(task)` ran the schedule-free optimizer's training weights, unlike
    validate and test (and a checkpoint's weights)."""
    task = BoringTask(BoringConfig(max_steps=5, valid_every_n_steps=None))
    run = mlfab.run.trainer.build_trainer(task.config, tmp_path, [])
    run.fit(task)
    training = [p.detach().clone() for p in task.parameters()]
    x = torch.randn(8, task.config.in_dim)
    (predicted,) = run.predict(task, dataloaders=torch.utils.data.DataLoader([(row, 0.0) for row in x], batch_size=8))
    saved = BoringTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    with torch.no_grad():
        assert torch.allclose(predicted, saved(x), atol=1e-5)  # type: ignore[arg-type]
    # The weights the fit left, the evaluation weights, stay.
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(task.parameters(), training, strict=True))


def test_a_fit_from_loaded_weights_counts_samples_and_time_from_step_0(tmp_path: Path) -> None:
    """`load_from_checkpoint` then `fit` (fine-tuning) starts at step 0; its sample and validation counts and its
    clock went on from the file's (48 samples at step 6 of batch 4), and the wait before the fit counted as time."""
    first = BoringTask(config(max_steps=6, valid_every_n_steps=None))
    mlfab.run.trainer.build_trainer(first.config, tmp_path / "first", []).fit(first)
    tuned = BoringTask.load_from_checkpoint(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=False)
    time.sleep(2.0)
    started = time.monotonic()
    mlfab.run.trainer.build_trainer(tuned.config, tmp_path / "tuned", []).fit(tuned)
    fit_s = time.monotonic() - started
    saved = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        for name in ("first", "tuned")
    }
    assert saved["tuned"]["global_step"] == 6
    assert saved["tuned"]["mlfab"]["num_samples"] == saved["first"]["mlfab"]["num_samples"] == 6 * BATCH
    assert saved["tuned"]["mlfab"]["num_valid_steps"] == saved["first"]["mlfab"]["num_valid_steps"]
    assert saved["tuned"]["mlfab"]["elapsed_time_s"] <= fit_s  # Not the first run's time, nor the wait after it.


class StepLosses(MapTask):
    """Keeps each training step's batch losses as `get_loss` computed them."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.step_losses: dict[int, list[float]] = {}

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            self.step_losses.setdefault(state.num_steps, []).append(float(loss))
        return loss


def test_a_checkpoint_monitoring_a_training_metric_is_scored_with_its_own_steps_value(tmp_path: Path) -> None:
    """ModelCheckpoint(monitor="train/loss/loss", every_n_train_steps=N) read the value before this step's was put
    there: each checkpoint was scored with an earlier step's loss (the last one a logger wrote)."""
    every = ModelCheckpoint(
        dirpath=tmp_path / "every", monitor="train/loss/loss", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    task = StepLosses(config())
    logger = mlfab.JsonLogger(tmp_path / "json", log_interval_seconds=0)  # Writes every step.
    fit_trainer(tmp_path, [every], logger=logger, max_steps=6, accumulate_grad_batches=2).fit(task)
    scores = {Path(path).stem: float(score) for path, score in every.best_k_models.items()}
    assert sorted(scores) == ["step=2", "step=4", "step=5", "step=6"]  # Step 5's after its validation.
    for name, score in scores.items():  # Step 2's checkpoint follows step index 1: the mean of its two batches.
        assert score == pytest.approx(np.mean(task.step_losses[int(name[5:]) - 1]), rel=1e-6), name


class RecordingRates(MapTask):
    """Records the rate each training step applies (as the optimizer step reads it)."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.rates: list[float] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])


class Weights(pl.Callback):
    """Keeps a copy of the weights each training step starts from."""

    def __init__(self, weights: list[Tensor]) -> None:
        self.weights = weights

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.weights.append(pl_module.layer.weight.detach().clone())


class TenthFrom(pl.Callback):
    """Divides every group's rate by ten before step `step`, as a hand-written decay or SWA's rate would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = group["lr"] / 10


class TenthJustBeforeTheUpdate(TenthFrom):
    """The same, in the last hook before the optimizer's update (after the step's backward)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pass

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        super().on_train_batch_start(trainer, pl_module, None, 0)


@pytest.mark.parametrize("callback", [TenthFrom, TenthJustBeforeTheUpdate])
def test_a_rate_set_after_the_warmup_by_a_callback_is_the_rate_applied(
    tmp_path: Path, callback: type[TenthFrom]
) -> None:
    """The warmup set the rate back after every step: a tenth from step 4 lasted one step. `optim/lr` is the rate
    applied (it was read before `on_before_optimizer_step`)."""
    task = RecordingRates(config(learning_rate=0.1, warmup_steps=2, max_steps=6))
    json_logger = mlfab.JsonLogger(tmp_path / "json", log_interval_seconds=0.0)
    trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[callback(4)], logger=json_logger).fit(task)
    expected = [0.05, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert task.rates == pytest.approx(expected, rel=1e-12)
    logged = [line["scalars"]["optim/lr"] for line in json_lines(tmp_path / "json") if "step" in line]
    assert logged == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("callback", [TenthFrom, TenthJustBeforeTheUpdate])
def test_a_rate_set_during_the_warmup_by_a_callback_is_refused(tmp_path: Path, callback: type[TenthFrom]) -> None:
    """Set in `on_before_optimizer_step`, it was applied: the warmup saw it after the step, and gave way to it."""
    task = RecordingRates(config(learning_rate=0.1, warmup_steps=4, max_steps=6))
    weights: list[Tensor] = []
    with pytest.raises(mlfab.ConfigError, match=r"set to 0\.005 .* \(1 of warmup_steps=4 steps done\)"):
        trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[callback(1), Weights(weights)]).fit(task)
    assert task.rates[0] == 0.025 and len(task.rates) <= 2  # Refused before a step applied it (the task's hook
    assert torch.equal(weights[-1], task.layer.weight)  # runs after the callback's): the weights of step 1.


class WithLBFGS(MapTask):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_the_rate_is_logged_once_a_step_under_an_optimizer_that_runs_its_closure_several_times(tmp_path: Path) -> None:
    """LBFGS runs the closure 3 times a step: the rate was logged 3 times and averaged (0.10000000000000002)."""
    json_logger = mlfab.JsonLogger(tmp_path / "json", log_interval_seconds=0.0)
    trainer(tmp_path, max_steps=3, limit_val_batches=0, logger=json_logger).fit(WithLBFGS(config(max_steps=3)))
    rates = [line["scalars"]["optim/lr"] for line in json_lines(tmp_path / "json") if "step" in line]
    assert rates == [0.1, 0.1, 0.1]


def test_a_periodic_checkpoint_at_an_epochs_last_step_is_written_at_that_step(tmp_path: Path) -> None:
    """8 batches an epoch, save_every_n_steps=4: Lightning put off step 8's save to a validation it expected after the
    epoch's last batch; mlfab ran none there, so the file was lost (and written at step 10's final validation)."""
    exp = tmp_path / "run"
    MapTask.launch(config(max_steps=10, save_every_n_steps=4, valid_every_n_steps=None, exp_dir=str(exp)), argv=[])
    periodic = sorted(p.name for p in (exp / "checkpoints").glob("step_*.ckpt"))
    assert periodic == ["step_00000004.ckpt", "step_00000008.ckpt"]
    assert torch.load(exp / "checkpoints" / "step_00000008.ckpt", weights_only=True)["global_step"] == 8
