"""A tiny "boring" task that trains on CPU in a second or two, for smoke tests (yours and mlfab's).

    from mlfab.testing import BoringConfig, BoringTask
    BoringTask.launch(BoringConfig(max_steps=20), argv=[])

Also writes small MNIST files in the IDX format, so the real dpshdl MNIST loader can run offline.
"""

import gzip
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from dpshdl.dataset import Dataset
from PIL import Image, ImageSequence
from torch import Tensor, nn

import mlfab


@dataclass(kw_only=True)
class BoringConfig(mlfab.Config):
    batch_size: int = mlfab.field(8, help="Samples per batch")
    in_dim: int = mlfab.field(4, help="Input features")
    max_steps: int | None = mlfab.field(20, help="Training steps")
    valid_every_n_steps: int | None = mlfab.field(10, help="Validate every N steps")
    valid_batches: int = mlfab.field(2, help="Batches per validation")
    warmup_steps: int = mlfab.field(0, help="Warmup steps")
    learning_rate: float = mlfab.field(5e-2, help="Learning rate")


class RegressionDataset(Dataset[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """Endless samples of y = x @ w + noise, with a fixed w; each dpshdl worker draws its own samples."""

    def __init__(self, in_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.seed = seed
        self.weight = np.random.default_rng(1234).normal(size=(in_dim,)).astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def worker_init(self, worker_id: int, num_workers: int) -> None:
        super().worker_init(worker_id, num_workers)
        self.rng = np.random.default_rng((self.seed, worker_id, num_workers))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        x = self.rng.normal(size=(self.in_dim,)).astype(np.float32)
        y = np.float32(x @ self.weight + 0.01 * self.rng.normal())
        return x, np.asarray(y, dtype=np.float32)


class BoringTask(mlfab.Task[BoringConfig]):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.layer = nn.Linear(config.in_dim, 1)

    def get_dataset(self, phase: mlfab.Phase) -> RegressionDataset:
        return RegressionDataset(self.config.in_dim, seed=0 if phase == "train" else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).squeeze(-1)

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x, y = batch
        yhat = self(x)
        self.log_step(batch, yhat, state)
        return F.mse_loss(yhat, y)


def write_idx_mnist(root: str | Path, num_train: int = 256, num_test: int = 64, seed: int = 0) -> Path:
    """Writes `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` into `root` (dpshdl's MNIST file names). dpshdl's
    `MNIST(root_dir=d)` reads them from `d/mnist`: pass that folder as `root` (else it downloads the real MNIST).

    Each image has a bright square whose position depends on its label, so a model can learn it quickly.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 5)
            images[i, 4 + r * 10 : 12 + r * 10, 1 + c * 5 : 5 + c * 5] = 255
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    return root


def read_scalars(event_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in a directory, read with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_images(event_dir: str | Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """{tag: [(step, array), ...]} decoded from the TensorBoard event files in a directory: an image as an HWC RGB
    uint8 array, a video (a GIF there) as a THWC one of its frames (the GIF holds a run of equal frames as one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"images": 0})
    acc.Reload()
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for tag in acc.Tags()["images"]:
        out[tag] = [(e.step, _pixels(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]
    return out


def _pixels(image: Image.Image) -> np.ndarray:
    """RGB pixels: HWC of an image (PNG), THWC of a video (GIF, also of one frame)."""
    frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    return np.stack(frames) if image.format == "GIF" else frames[0]


__all__ = ["BoringConfig", "BoringTask", "RegressionDataset", "read_images", "read_scalars", "write_idx_mnist"]
