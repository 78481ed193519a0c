"""Batches of every shape a collate may return reach the task as tensors in the same containers, are counted by their
samples, and a collate that returns nothing, or a batch mlfab cannot convert, is reported for what it is."""

import collections
import dataclasses
import json
import logging
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mlfab
from mlfab.data import to_device, to_torch
from mlfab.errors import report
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset, read_scalars


@dataclasses.dataclass
class Sample:
    x: np.ndarray
    y: np.ndarray
    label: np.ndarray


class DataclassSamples(RegressionDataset):
    """Dataclass samples, which dpshdl's own collate stacks into a dataclass batch of numpy arrays."""

    def next(self) -> Sample:  # type: ignore[override]
        x, y = super().next()
        return Sample(x, y, np.asarray(int(x[0] > 0), dtype=np.uint8))


class JsonTask(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0))


def json_lines(exp_dir: Path, phase: str) -> list[dict[str, Any]]:
    lines = (exp_dir / "json" / "log.jsonl").read_text().splitlines()
    return [d for d in map(json.loads, lines) if d.get("phase") == phase]


@pytest.mark.integration
def test_a_dataclass_batch_reaches_get_loss_as_tensors_and_counts_its_samples(tmp_path: Path) -> None:
    seen: list[tuple[type, dict[str, tuple[type, Any, Any]], int]] = []

    class Task(JsonTask):
        def get_dataset(self, phase: mlfab.Phase) -> DataclassSamples:
            return DataclassSamples(self.config.in_dim, seed=0 if phase == "train" else 1)

        def get_loss(self, batch: Sample, state: mlfab.State) -> Tensor:  # type: ignore[override]
            fields = {f: getattr(batch, f) for f in ("x", "y", "label")}
            seen.append((type(batch), {f: (type(v), v.dtype, v.device == self.device) for f, v in fields.items()}, 0))
            return F.mse_loss(self(batch.x), batch.y)

    exp = tmp_path / "run"
    Task.launch(BoringConfig(max_steps=3, valid_every_n_steps=None, exp_dir=str(exp)), argv=[])
    expected = {
        "x": (Tensor, torch.float32, True),
        "y": (Tensor, torch.float32, True),
        "label": (Tensor, torch.uint8, True),
    }
    assert seen and all(t is Sample and fields == expected for t, fields, _ in seen)
    train = json_lines(exp, "train")
    assert [d["num_samples"] for d in train] == [8, 16, 24]  # batch_size 8: it read 1, 2, 3 (one per batch).
    for d in train:
        speed = d["scalars"]
        assert speed["speed/samples_per_second"] == pytest.approx(8 * speed["speed/steps_per_second"], rel=1e-3)


@dataclasses.dataclass
class Indexed:
    x: np.ndarray
    y: np.ndarray
    index: np.ndarray


class MapWithDataclassBatches(torch.utils.data.Dataset):
    """A map-style dataset whose own collate returns a dataclass of numpy arrays (sample `i` has index `i`)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], i

    def collate(self, items: list[tuple[np.ndarray, int]]) -> Indexed:
        x = np.stack([x for x, _ in items])
        return Indexed(x, x.sum(1), np.asarray([i for _, i in items], dtype=np.int64))


@pytest.mark.integration
def test_a_short_last_dataclass_batch_weighs_its_samples_in_the_validation_mean(tmp_path: Path) -> None:
    class Task(JsonTask):
        def get_dataset(self, phase: mlfab.Phase) -> MapWithDataclassBatches:
            return MapWithDataclassBatches(64 if phase == "train" else 20)

        def get_loss(self, batch: Indexed, state: mlfab.State) -> Tensor:  # type: ignore[override]
            self.log_step(batch, None, state)
            return F.mse_loss(self(batch.x), batch.y)

        def log_valid_step(self, batch: Indexed, output: Any, state: mlfab.State) -> None:  # type: ignore[override]
            self.log_scalar("index", batch.index.float().mean())

    exp = tmp_path / "run"
    Task.launch(BoringConfig(max_steps=2, valid_batches=10, valid_every_n_steps=None, exp_dir=str(exp)), argv=[])
    (valid, *_) = json_lines(exp, "valid")
    # 20 samples in batches of 8, 8 and 4: the mean over samples is 9.5; the batch means' mean would be 10.83.
    assert valid["scalars"]["value/index"] == pytest.approx(9.5)
    assert [d["num_samples"] for d in json_lines(exp, "train")] == [8, 16]


@pytest.mark.integration
def test_a_defaultdict_batch_keeps_its_type_and_trains(tmp_path: Path) -> None:
    seen: list[tuple[type, Any, type]] = []

    class DefaultdictBatches(RegressionDataset):
        def collate(self, items: list[tuple[np.ndarray, np.ndarray]]) -> collections.defaultdict:  # type: ignore[override]
            out: collections.defaultdict[str, list[np.ndarray]] = collections.defaultdict(list)
            for x, y in items:
                out["x"].append(x)
                out["y"].append(y)
            return collections.defaultdict(list, {k: np.stack(v) for k, v in out.items()})

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> DefaultdictBatches:
            return DefaultdictBatches(self.config.in_dim)

        def get_loss(self, batch: Any, state: mlfab.State) -> Tensor:
            seen.append((type(batch), batch.default_factory, type(batch["x"])))
            return F.mse_loss(self(batch["x"]), batch["y"])

    exp = tmp_path / "run"
    Task.launch(BoringConfig(max_steps=3, max_bad_samples_in_a_row=3, exp_dir=str(exp)), argv=[])
    assert seen and set(seen) == {(collections.defaultdict, list, Tensor)}
    assert "data/skipped_batches" not in read_scalars(exp / "tensorboard" / "train")


class Forgetful(torch.utils.data.Dataset):
    """A map-style dataset whose collate lacks its `return`."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        return np.full(4, i, dtype=np.float32), np.float32(i)

    def collate(self, items: list[Any]) -> Any:
        torch.utils.data.default_collate(items)


@pytest.mark.integration
def test_a_collate_that_returns_none_stops_the_run_naming_it(tmp_path: Path) -> None:
    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Forgetful:
            return Forgetful()

    config = BoringConfig(max_steps=3, max_bad_samples_in_a_row=3, exp_dir=str(tmp_path / "run"))
    with pytest.raises(mlfab.DatasetError) as info:
        Task.launch(config, argv=[])
    message = str(info.value)
    assert message.startswith("3 batches in a row from Forgetful failed to collate (max_bad_samples_in_a_row=3")
    assert "Forgetful.collate returned None for a batch of 8 samples" in message and "`return` missing" in message
    assert f"(at {__file__}:" in message  # Where the collate is.


class SometimesNone(RegressionDataset):
    """dpshdl's way to drop a batch it cannot collate: every third batch is None."""

    def __init__(self, in_dim: int, seed: int) -> None:
        super().__init__(in_dim, seed)
        self.batches = 0

    def collate(self, items: list[Any]) -> Any:
        self.batches += 1
        return None if self.batches % 3 == 2 else super().collate(items)


@pytest.mark.integration
def test_batches_a_collate_returns_as_none_are_warned_about_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> SometimesNone:
            return SometimesNone(self.config.in_dim, seed=0 if phase == "train" else 1)

    exp = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mlfab.data"):
        Task.launch(BoringConfig(max_steps=4, valid_batches=3, valid_every_n_steps=None, exp_dir=str(exp)), argv=[])
    warnings = [r.getMessage() for r in caplog.records if r.name == "mlfab.data"]
    assert len(warnings) == 4  # Training's 2nd and 5th batch, and each of the 2 validation runs' 2nd batch.
    assert all(
        w.startswith(
            "Skipping a batch from SometimesNone that failed to collate: DatasetError: SometimesNone.collate "
            "returned None for a batch of 8 samples"
        )
        for w in warnings
    )
    assert read_scalars(exp / "tensorboard" / "train")["data/skipped_batches"][-1] == (3, 2.0)  # 2nd and 5th batch.


@pytest.mark.integration
def test_a_batch_mlfab_cannot_convert_is_not_blamed_on_the_collate(tmp_path: Path) -> None:
    class Pair(tuple):
        def __new__(cls, x: Any, y: Any) -> "Pair":
            return super().__new__(cls, (x, y))

    class PairBatches(RegressionDataset):
        def collate(self, items: list[tuple[np.ndarray, np.ndarray]]) -> Pair:  # type: ignore[override]
            return Pair(np.stack([x for x, _ in items]), np.stack([y for _, y in items]))

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> PairBatches:
            return PairBatches(self.config.in_dim)

    with pytest.raises(mlfab.DatasetError) as info:
        Task.launch(BoringConfig(max_steps=3, max_bad_samples_in_a_row=3, exp_dir=str(tmp_path / "run")), argv=[])
    message = str(info.value)
    assert message.startswith("mlfab could not turn the numpy arrays in the batch from PairBatches.collate (a Pair)")
    assert "failed to collate" not in message


class DataclassItems(torch.utils.data.Dataset):
    """A torch map-style dataset of dataclass samples without a `collate`: torch's default_collate has no rule."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Sample:
        x = np.full(4, i, dtype=np.float32)
        return Sample(x, x[:1], np.asarray(i % 2, dtype=np.uint8))


@pytest.mark.integration
@pytest.mark.parametrize("num_workers", [0, 2])
def test_samples_default_collate_cannot_batch_stop_the_run_at_the_first_batch(
    tmp_path: Path, num_workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each batch was skipped as "failed to collate" until max_bad_samples_in_a_row: the samples' type, not bad data.
    From a dataloader worker, the `error:` line shows the message, not torch's re-raise with the worker's traceback."""

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> DataclassItems:
            return DataclassItems()

    config = BoringConfig(max_steps=3, num_dataloader_workers=num_workers, exp_dir=str(tmp_path / "run"))
    with pytest.raises(mlfab.DatasetError) as info:
        Task.launch(config, argv=[])
    assert report(info.value) == 1
    message = capsys.readouterr().err
    assert message.startswith(
        "error: DataclassItems has no `collate` method, and torch's default_collate cannot batch its samples: "
        "default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; found <class "
    )
    assert "Give the dataset a `collate(self, items)` method" in message and "failed to collate" not in message
    assert message.endswith("strings in tuples, lists or dicts.\n" if num_workers == 0 else " process 0)\n")
    assert "Traceback" not in message


class Refusing(Forgetful):
    """A map-style dataset whose every batch fails to collate."""

    def collate(self, items: list[Any]) -> Any:
        raise ValueError("no batch today")


@pytest.mark.integration
def test_a_training_set_whose_every_batch_failed_to_collate_is_not_called_too_small(tmp_path: Path) -> None:
    """Fewer failed batches than max_bad_samples_in_a_row, and none left: "at least batch_size samples" was wrong."""

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Refusing:
            return Refusing()

    with pytest.raises(mlfab.DatasetError) as info:
        Task.launch(BoringConfig(max_steps=3, exp_dir=str(tmp_path / "run")), argv=[])
    assert str(info.value) == (
        "The training dataset (Refusing) produced no batches: all 8 of its batches failed to collate (the warnings "
        "above say why)."
    )


@pytest.mark.integration
def test_an_evaluation_whose_every_batch_failed_to_collate_says_so(tmp_path: Path) -> None:
    """Its progress line came and went, and then no values, without a word beyond the rate-limited skip warnings."""

    class Task(BoringTask):
        def get_dataset(self, phase: mlfab.Phase) -> Any:
            return super().get_dataset(phase) if phase == "train" else Refusing()

    config = BoringConfig(max_steps=4, valid_every_n_steps=2, valid_batches=3, exp_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning) as said:
        Task.launch(config, argv=[])
    nothing = [str(w.message) for w in said if "evaluated none of its batches" in str(w.message)]
    assert nothing == [
        f"The valid run at step {step} evaluated none of its batches: all 3 failed to collate (the warnings above say "
        "why), so it has no values to write."
        for step in (1, 2, 4)  # After the first step, then every 2.
    ]
    assert "valid/loss/loss" not in read_scalars(tmp_path / "run" / "tensorboard" / "valid")


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: Any
    n: int = dataclasses.field(default=0, init=False)  # Derived in __post_init__, not converted.

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", len(self.x))


@pytest.mark.unit
def test_to_torch_converts_inside_every_container_and_keeps_its_type() -> None:
    image = np.arange(6, dtype=np.uint8).reshape(2, 3)
    batch = {
        "frozen": Frozen(image),
        "ordered": collections.OrderedDict(a=image),
        "proxy": types.MappingProxyType({"a": image}),  # No copy: a plain dict.
        "scalars": [np.zeros((), dtype=np.float16), np.uint64(3)],
        "text": np.array(["a cat", "a dog"]),  # No torch dtype: stays numpy.
        "big_endian": np.arange(3, dtype=">u4"),
        "reversed": image[:, ::-1],
    }
    out = to_torch(batch)
    assert type(out["frozen"]) is Frozen and out["frozen"].n == 2 and out["frozen"].x.dtype == torch.uint8
    assert type(out["ordered"]) is collections.OrderedDict and out["ordered"]["a"].dtype == torch.uint8
    assert type(out["proxy"]) is dict and isinstance(out["proxy"]["a"], Tensor)
    assert [(s.shape, s.dtype) for s in out["scalars"]] == [(torch.Size([]), torch.float16), ((), torch.uint64)]
    assert isinstance(out["text"], np.ndarray)
    assert out["big_endian"].tolist() == [0, 1, 2] and out["reversed"].tolist() == [[2, 1, 0], [5, 4, 3]]
    assert isinstance(batch["frozen"].x, np.ndarray)  # The collate's own batch is left as it was.


@pytest.mark.unit
def test_to_device_moves_a_frozen_dataclass_batch_which_lightning_refuses() -> None:
    batch = {"a": [Frozen(torch.zeros(2, dtype=torch.int16))], "b": "text"}
    moved = to_device(batch, torch.device("meta"))
    (frozen,) = moved["a"]
    assert type(frozen) is Frozen and frozen.x.device.type == "meta" and frozen.x.dtype == torch.int16
    assert moved["b"] == "text" and batch["a"][0].x.device.type == "cpu"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: Any
    y: Any


class FrozenPairs(torch.utils.data.Dataset):
    """Map-style pairs whose collate returns a frozen dataclass."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return x, np.float32(x.sum())

    def collate(self, items: list[tuple[np.ndarray, np.float32]]) -> FrozenBatch:
        xs, ys = zip(*items, strict=True)
        return FrozenBatch(np.stack(xs), np.stack(ys))


@pytest.mark.integration
def test_a_frozen_dataclass_batch_trains(tmp_path: Path) -> None:
    """Lightning's move of a batch to the device refuses a frozen dataclass ("A frozen dataclass was passed to
    `apply_to_collection`"): every such run crashed at its first batch."""
    seen: list[tuple[type, torch.device, int]] = []

    class Task(JsonTask):
        def get_dataset(self, phase: mlfab.Phase) -> FrozenPairs:
            return FrozenPairs()

        def get_loss(self, batch: FrozenBatch, state: mlfab.State) -> Tensor:  # type: ignore[override]
            seen.append((type(batch), batch.x.device, self.get_num_samples(batch)))
            return F.mse_loss(self(batch.x), batch.y)

    Task.launch(BoringConfig(max_steps=3, batch_size=8, valid_batches=0, exp_dir=str(tmp_path / "run")), argv=[])
    assert seen == [(FrozenBatch, torch.device("cpu"), 8)] * 3


class DefaultdictPairs(FrozenPairs):
    """FrozenPairs' samples, collated into a defaultdict."""

    def collate(self, items: list[tuple[np.ndarray, np.float32]]) -> collections.defaultdict:  # type: ignore[override]
        batch = super().collate(items)
        return collections.defaultdict(list, {"x": batch.x, "y": batch.y})


def _inputs(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Sample | FrozenBatch):
        return batch.x, batch.y
    return batch["x"], batch["y"]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["dpshdl dataclass", "frozen dataclass", "defaultdict"])
def test_a_run_of_batches_of_its_own_type_resumes_exactly(tmp_path: Path, kind: str) -> None:
    """The batch in flight is in the checkpoint: torch's safe loading refused a dataclass or defaultdict there, so
    every relaunch of such a run stopped with a CheckpointError."""
    losses: dict[str, list[tuple[int, float]]] = {}

    class Task(JsonTask):
        def get_dataset(self, phase: mlfab.Phase) -> Any:
            if kind == "dpshdl dataclass":
                return DataclassSamples(self.config.in_dim, seed=0 if phase == "train" else 1)
            return FrozenPairs() if kind == "frozen dataclass" else DefaultdictPairs()

        def get_loss(self, batch: Any, state: mlfab.State) -> Tensor:
            x, y = _inputs(batch)
            loss = F.mse_loss(self(x), y)
            if state.phase == "train":
                losses.setdefault(self.config.run_dir or "", []).append((state.num_steps, float(loss)))
            return loss

    def launch(name: str, max_steps: int) -> None:
        config = BoringConfig(max_steps=max_steps, batch_size=8, valid_batches=0, run_dir=name)
        Task.launch(config, argv=[f"exp_dir={tmp_path / name}"])

    launch("whole", 4)
    launch("resumed", 2)
    launch("resumed", 4)  # Goes on from step 2, with the batch Lightning had fetched for step 2 replayed first.
    assert losses["resumed"] == losses["whole"]


class PlainNumbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)), torch.tensor(float(i))


class CollatesOnTheTask(BoringTask):
    """A `collate` written on the task, where Lightning users put data hooks: mlfab never called it."""

    def collate(self, items: list[Any]) -> Any:
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs) * 0, torch.stack(ys)

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return PlainNumbers()


class HandsItOver(CollatesOnTheTask):
    def get_dataset(self, phase: mlfab.Phase) -> Any:
        dataset = PlainNumbers()
        dataset.collate = self.collate  # type: ignore[attr-defined]
        return dataset


@pytest.mark.integration
def test_a_collate_on_the_task_is_refused_unless_the_dataset_takes_it(tmp_path: Path) -> None:
    config = BoringConfig(exp_dir=str(tmp_path / "run"), max_steps=2, valid_every_n_steps=None)
    with pytest.raises(
        mlfab.TaskDefinitionError, match=r"CollatesOnTheTask.collate would never be called.*PlainNumbers has none"
    ):
        CollatesOnTheTask.launch(config, argv=[])
    for dataset, which in ((RegressionDataset(4), "RegressionDataset has none"), (Forgetful(), "Forgetful's own")):
        task = type("Collating", (CollatesOnTheTask,), {"get_dataset": lambda self, phase, d=dataset: d})
        with pytest.raises(mlfab.TaskDefinitionError, match=rf"Collating.collate would never be called.*\({which}"):
            task.launch(config, argv=[])  # A dpshdl set (which always has dpshdl's collate), a set with its own.
    HandsItOver.launch(config, argv=["exp_dir=" + str(tmp_path / "handed")])
    assert (tmp_path / "handed" / "checkpoints" / "last.ckpt").is_file()
