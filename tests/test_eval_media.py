"""Media logged in validation and test come from the first batch of each evaluation: a full grid (not the partial
last batch) showing the same samples at every validation, and only that batch's lazy values are computed."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

import mlfab
from mlfab.logs.buffer import LogBuffer
from mlfab.testing import BoringConfig, BoringTask, read_images, read_scalars

TILE = 6  # Pixels on a side of each logged image (keep_resolution: they reach the grid as they are).


def _counter(calls: list[str], name: str, value: Any) -> Any:
    return lambda: calls.append(name) or value


@pytest.mark.unit
@pytest.mark.parametrize("phase", ["valid", "test"])
def test_evaluation_buffer_keeps_the_first_value_and_never_computes_the_others(phase: Any) -> None:
    buffer = LogBuffer(phase)
    calls: list[str] = []
    for batch, weight in enumerate((8, 8, 4)):
        buffer.weight = weight
        buffer.add("scalar", "value/loss", _counter(calls, f"scalar{batch}", float(batch)))
        for kind in ("string", "image", "audio", "video", "histogram", "point_cloud"):
            buffer.add(kind, f"value/{kind}", _counter(calls, f"{kind}{batch}", f"{kind} of batch {batch}"))
    out = buffer.resolve(step=3)
    for kind in ("string", "image", "audio", "video", "histogram", "point_cloud"):
        assert out[kind] == {f"value/{kind}": f"{kind} of batch 0"}
    assert out["scalar"]["value/loss"] == pytest.approx((0 * 8 + 1 * 8 + 2 * 4) / 20)  # Scalars: every batch.
    assert sorted(c for c in calls if not c.startswith("scalar")) == sorted(
        f"{kind}0" for kind in ("string", "image", "audio", "video", "histogram", "point_cloud")
    )
    buffer.clear()  # The next evaluation starts afresh.
    buffer.add("image", "value/image", "next evaluation")
    assert buffer.resolve(step=4)["image"] == {"value/image": "next evaluation"}


@pytest.mark.unit
@pytest.mark.parametrize("phase", [None, "train"])
def test_training_buffer_keeps_the_last_value_of_a_step(phase: Any) -> None:
    buffer = LogBuffer() if phase is None else LogBuffer(phase)
    calls: list[str] = []
    for micro_batch in range(3):  # Accumulated batches of one optimizer step.
        buffer.add("image", "value/image", _counter(calls, f"image{micro_batch}", micro_batch))
    assert buffer.resolve(step=0)["image"] == {"value/image": 2}
    assert calls == ["image2"]


class Indexed(torch.utils.data.Dataset):
    """20 samples, so batches of 8 end on a partial batch of 4: (x, i) with x = [i, 0, 0, 0]."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        return np.array([i, 0, 0, 0], dtype=np.float32), np.float32(i)


class FirstBatchMedia(BoringTask):
    """Logs, at every evaluation batch, a grid of images whose pixels are 10 x the sample index, and a string, a
    histogram and a scalar; it records which batches' lazy values are computed."""

    made: list[tuple[str, int]] = []

    def set_loggers(self) -> None:
        self.add_logger(mlfab.TensorboardLogger(self.exp_dir, log_interval_seconds=0))

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        return super().get_dataset(phase) if phase == "train" else Indexed()

    def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
        index = batch[1].long()
        first = int(index[0])

        def images() -> Tensor:
            FirstBatchMedia.made.append((state.phase, first))
            return (index * 10).to(torch.uint8)[:, None, None].expand(-1, TILE, TILE)

        self.log_images("grid", images, max_images=6, keep_resolution=True)
        self.log_string("first_index", lambda: str(first))
        self.log_histogram("indices", index.float())
        self.log_scalar("mean_index", index.float().mean())


SHOWN = [0, 1, 3, 4, 6, 7]  # max_images=6 of a batch of 8: spread evenly over it, as mlfab 0.2 picked them.


def _check_grid(grid: np.ndarray) -> None:
    """Six tiles (3 columns, 2 rows, no separator: max_images of the first batch of 8), tile k showing sample
    SHOWN[k]."""
    assert grid.shape[:2] == (2 * TILE, 3 * TILE)
    for k, sample in enumerate(SHOWN):
        row, col = divmod(k, 3)
        tile = grid[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
        assert (tile == 10 * sample).all(), f"tile {k} shows {np.unique(tile)}, not sample {sample}"


def _text(acc: EventAccumulator, tag: str) -> list[str]:
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]
    return [t.removeprefix("```\n").removesuffix("\n```") for t in texts]  # Shown verbatim: in a code block.


@pytest.mark.integration
def test_validation_and_test_media_show_the_first_full_batch(tmp_path: Path) -> None:
    FirstBatchMedia.made = []
    config = BoringConfig(max_steps=4, valid_every_n_steps=2, valid_batches=10, run_dir=str(tmp_path))
    FirstBatchMedia.launch(config, argv=[])
    (exp,) = (tmp_path / "first_batch_media").iterdir()
    valid_dir = exp / "tensorboard" / "valid"

    grids = read_images(valid_dir)["value/grid"]
    assert [step for step, _ in grids] == [1, 2, 4]  # The first validation comes early (valid_first_n_seconds).
    for _, grid in grids:  # Each validation: the same, full grid of the first batch.
        _check_grid(grid)
    assert FirstBatchMedia.made == [("valid", 0)] * 3  # The later batches' images were never made.

    acc = EventAccumulator(str(valid_dir), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    assert _text(acc, "value/first_index") == ["0"] * 3
    assert [h.histogram_value.num for h in acc.Histograms("value/indices")] == [8] * 3
    assert [v for _, v in read_scalars(valid_dir)["value/mean_index"]] == [pytest.approx(9.5)] * 3  # All 20.

    FirstBatchMedia.made = []
    FirstBatchMedia.launch(config, argv=["test", f"--model.config.run_dir={tmp_path / 'test'}"])
    (test_exp,) = (tmp_path / "test" / "first_batch_media").iterdir()
    (test_grid,) = read_images(test_exp / "tensorboard" / "test")["value/grid"]
    _check_grid(test_grid[1])
    assert FirstBatchMedia.made == [("test", 0)]
