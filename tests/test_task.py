"""Task behaviour through real (tiny) training runs on CPU."""

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlfab
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset, read_scalars


def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "runs")


def only_exp_dir(tmp_path: Path, name: str = "boring_task") -> Path:
    (exp,) = (tmp_path / "runs" / name).iterdir()
    return exp


@pytest.mark.unit
def test_task_without_generic_config_explains_declaration() -> None:
    class NoConfig(mlfab.Task):  # type: ignore[type-arg]
        pass

    with pytest.raises(mlfab.TaskDefinitionError, match=r"class NoConfig\(mlfab.Task\[Config\]\)"):
        NoConfig({"batch_size": 2})


@pytest.mark.integration
def test_get_dataset_not_implemented(tmp_path: Path) -> None:
    class NoData(mlfab.Task[BoringConfig]):
        def __init__(self, config: BoringConfig) -> None:
            super().__init__(config)
            self.layer = nn.Linear(4, 1)

    with pytest.raises(mlfab.TaskDefinitionError, match=r"NoData must implement `get_dataset\(self, phase\)`"):
        NoData.launch(BoringConfig(run_dir=run_dir(tmp_path)), argv=[])


@pytest.mark.integration
def test_get_dataset_returning_non_dataset(tmp_path: Path) -> None:
    class BadData(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> object:
            return 42

    message = r"BadData.get_dataset\('train'\) returned int, which is not a dataset"
    with pytest.raises(mlfab.DatasetError, match=message):
        BadData.launch(BoringConfig(run_dir=run_dir(tmp_path)), argv=[])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (None, r"get_loss returned NoneType; it must return a scalar Tensor"),
        (torch.ones(3), r"returned a tensor of shape \(3,\) for loss 'loss'; each loss must be a scalar, or one value"),
    ],
)
def test_get_loss_bad_return(tmp_path: Path, loss: object, message: str) -> None:
    class BadLoss(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            return loss  # type: ignore[return-value]

    with pytest.raises(mlfab.TaskDefinitionError, match=message):
        BadLoss.launch(BoringConfig(run_dir=run_dir(tmp_path)), argv=[])


@pytest.mark.integration
def test_training_writes_run_directory_and_loss_goes_down(tmp_path: Path) -> None:
    BoringTask.launch(BoringConfig(max_steps=60, valid_every_n_steps=20, run_dir=run_dir(tmp_path)), argv=[])
    exp = only_exp_dir(tmp_path)
    assert exp.name == "run_0"
    assert "\nmodel:\n  config:\n    batch_size: 8\n" in (exp / "config.yaml").read_text()
    assert (exp / "checkpoints" / "last.ckpt").is_file()
    valid = read_scalars(exp / "tensorboard" / "valid")["loss/loss"]
    # Validation after the first step, then every 20 steps, and at the end.
    assert [step for step, _ in valid] == [1, 20, 40, 60]
    assert valid[-1][1] < 0.5 * valid[0][1]
    train = read_scalars(exp / "tensorboard" / "train")["loss/loss"]
    assert train[0][0] == 0  # The first line of a phase is always written; steps count from 0.

    # A second launch gets the next run directory.
    BoringTask.launch(BoringConfig(max_steps=2, run_dir=run_dir(tmp_path)), argv=[])
    assert sorted(p.name for p in (tmp_path / "runs" / "boring_task").iterdir()) == ["run_0", "run_1"]


@pytest.mark.integration
def test_dict_loss_is_summed_and_each_part_logged(tmp_path: Path) -> None:
    seen: list[float] = []

    class TwoLosses(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> dict[str, Tensor]:
            x, y = batch
            mse = F.mse_loss(self(x), y)
            l1 = self.layer.weight.abs().sum() * 0.0 + 1.0
            seen.append(float(mse) + float(l1))
            return {"mse": mse, "l1": l1}

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            total = super().training_step(batch, batch_idx)
            assert abs(float(total) - seen[-1]) < 1e-5
            return total

    TwoLosses.launch(BoringConfig(max_steps=3, run_dir=run_dir(tmp_path)), argv=[])
    scalars = read_scalars(only_exp_dir(tmp_path, "two_losses") / "tensorboard" / "valid")
    assert {"loss/mse", "loss/l1"} <= set(scalars)
    assert scalars["loss/l1"][0][1] == pytest.approx(1.0)


@pytest.mark.integration
def test_state_counters_follow_the_trainer(tmp_path: Path) -> None:
    states: list[mlfab.State] = []

    class Recording(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            states.append(state)
            return super().get_loss(batch, state)

    Recording.launch(
        BoringConfig(
            max_steps=4, batches_per_step=2, valid_every_n_steps=2, valid_batches=3, run_dir=run_dir(tmp_path)
        ),
        argv=[],
    )
    train = [s for s in states if s.phase == "train"]
    valid = [s for s in states if s.phase == "valid"]
    assert [s.num_steps for s in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s.num_samples for s in train] == [8 * i for i in range(8)]
    # Validation after step 1, step 2 and step 4, three batches each.
    assert [s.num_steps for s in valid] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert [s.num_valid_steps for s in valid] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # Validations done before (0.2's).
    assert all(b.elapsed_time_s >= a.elapsed_time_s for a, b in zip(states, states[1:], strict=False))


class FixedStream(torch.utils.data.IterableDataset):
    """The same samples in the same order for every run."""

    def __iter__(self):  # noqa: ANN204
        gen = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(3, generator=gen), torch.randn((), generator=gen)


class LinearTask(mlfab.Task[BoringConfig]):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.layer = nn.Linear(3, 1)
        torch.nn.init.constant_(self.layer.weight, 0.5)
        torch.nn.init.constant_(self.layer.bias, 0.0)

    def get_dataset(self, phase: mlfab.Phase) -> FixedStream:
        return FixedStream()

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x).squeeze(-1), y)


@pytest.mark.integration
def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    def weights_after(batch_size: int, batches_per_step: int, name: str) -> Tensor:
        config = BoringConfig(
            batch_size=batch_size,
            batches_per_step=batches_per_step,
            max_steps=3,
            valid_every_n_steps=None,
            valid_batches=0,
            exp_dir=str(tmp_path / name),
        )
        task = LinearTask(config)
        trainer = pl.Trainer(
            max_steps=3,
            accumulate_grad_batches=batches_per_step,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(task)
        return torch.cat([p.detach().flatten() for p in task.parameters()])

    big = weights_after(8, 1, "big")
    accumulated = weights_after(4, 2, "acc")
    moved = weights_after(4, 1, "small")
    torch.testing.assert_close(accumulated, big, rtol=0, atol=1e-6)
    assert not torch.allclose(moved, big, atol=1e-4)  # The comparison can tell different updates apart.


@pytest.mark.integration
def test_batches_keep_integer_dtypes_and_reach_the_device(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    class Ints(RegressionDataset):
        def next(self) -> tuple[np.ndarray, np.ndarray]:
            x, _ = super().next()
            return x, np.array(3, dtype=np.uint8)

    class IntTask(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Ints:
            return Ints(self.config.in_dim)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            x, y = batch
            seen.update(x=x, y=y, device=self.device)
            return F.mse_loss(self(x), y.float())

    IntTask.launch(BoringConfig(max_steps=1, run_dir=run_dir(tmp_path)), argv=[])
    assert isinstance(seen["x"], Tensor) and seen["x"].dtype == torch.float32  # type: ignore[union-attr]
    assert seen["y"].dtype == torch.uint8 and seen["y"].shape == (8,)  # type: ignore[union-attr]
    assert seen["x"].device == seen["device"]  # type: ignore[union-attr]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_torch_datasets_train(tmp_path: Path, kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # noqa: ANN204
            while True:
                yield from zip(x, y, strict=True)

    class TorchData(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> torch.utils.data.Dataset:
            return torch.utils.data.TensorDataset(x, y) if kind == "map" else Stream()

    TorchData.launch(
        BoringConfig(max_steps=40, valid_every_n_steps=20, learning_rate=0.05, run_dir=run_dir(tmp_path)), argv=[]
    )
    valid = read_scalars(only_exp_dir(tmp_path, "torch_data") / "tensorboard" / "valid")["loss/loss"]
    assert [s for s, _ in valid] == [1, 20, 40]
    assert valid[-1][1] < valid[0][1]


@pytest.mark.integration
def test_drop_in_trainer_with_lightning_tensorboard_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    class Counter(pl.Callback):
        calls = 0

        def on_train_batch_end(self, *args: object) -> None:
            Counter.calls += 1

    logger = TensorBoardLogger(str(tmp_path / "tb"), name="mine", version=0)
    task = BoringTask(BoringConfig())
    trainer = pl.Trainer(
        max_steps=12,
        logger=logger,
        callbacks=[Counter()],
        log_every_n_steps=5,
        val_check_interval=6,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(task)
    scalars = read_scalars(tmp_path / "tb" / "mine" / "version_0")
    # The first step, Lightning's log steps (4, 9: every 5th), the step the validation at 6 follows, and the last.
    assert [s for s, _ in scalars["train/loss/loss"]] == [0, 4, 5, 9, 11]
    assert [s for s, _ in scalars["valid/loss/loss"]] == [6, 12]
    assert Counter.calls == 12
    assert type(trainer.optimizers[0]).__name__ == "AdamWScheduleFree"


@pytest.mark.integration
def test_checkpoint_loads_weights_only_and_rebuilds_typed_config(tmp_path: Path) -> None:
    BoringTask.launch(BoringConfig(max_steps=5, in_dim=3, run_dir=run_dir(tmp_path)), argv=[])
    ckpt = only_exp_dir(tmp_path) / "checkpoints" / "last.ckpt"
    data = torch.load(ckpt, weights_only=True)
    assert data["global_step"] == 5
    assert data["optimizer_states"][0]["param_groups"][0]["train_mode"] is False  # Saved in eval mode.
    task = BoringTask.load_from_checkpoint(ckpt)
    assert isinstance(task.config, BoringConfig) and task.config.in_dim == 3
    torch.testing.assert_close(task.layer.weight, data["state_dict"]["layer.weight"])


@dataclass(kw_only=True)
class ChildConfig(BoringConfig):
    extra: int = mlfab.field(7, help="A field only the child config has")


class ChildTask(BoringTask, mlfab.Task[ChildConfig]):
    pass


@pytest.mark.unit
def test_subclass_without_init_uses_its_own_config() -> None:
    import inspect

    assert ChildTask.config_class() is ChildConfig
    assert inspect.signature(ChildTask.__init__).parameters["config"].annotation is ChildConfig
    task = ChildTask({"batch_size": 2, "extra": 9})
    assert isinstance(task.config, ChildConfig) and task.config.extra == 9


class Described:
    """A mixin without `__init__`, listed before the task: `class MyTask(SomeMixin, BaseTask)`."""

    def describe(self) -> str:
        return type(self).__name__


class MixedTask(Described, ChildTask):
    pass


@pytest.mark.unit
def test_subclass_without_init_after_a_mixin_runs_the_tasks_init() -> None:
    task = MixedTask({"extra": 3})  # Failed with "object.__init__() takes exactly one argument".
    assert task.describe() == "MixedTask" and task.config.extra == 3
    assert task.hparams["config"]["extra"] == 3  # Task.__init__ ran.


@pytest.mark.integration
def test_num_samples_counts_the_samples_of_each_batch_not_batch_size(tmp_path: Path) -> None:
    """A finite dataset's last batch is short (10 samples in batches of 4: 4, 4, 2): `num_samples` counts what was
    trained on, as mlfab 0.2 did."""

    class Ten(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(10):
                yield torch.full((4,), float(i)), torch.tensor(float(i))

    seen: list[int] = []

    class Counting(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Ten:
            return Ten()

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            if state.phase == "train":
                seen.append(state.num_samples)
            return super().get_loss(batch, state)

    exp = tmp_path / "run"
    Counting.launch(BoringConfig(batch_size=4, max_steps=4, valid_batches=0, exp_dir=str(exp)), argv=[])
    assert seen == [0, 4, 8, 10]  # The fourth step starts the second pass.
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["mlfab"]["num_samples"] == 14
