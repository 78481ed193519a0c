"""Handwritten digits, offline: the seed MNIST example's API on scikit-learn's bundled 8x8 digits.

python -m examples.digits                 # trains to >= 95% validation accuracy in about a minute on 2 CPU cores
python -m examples.digits max_steps=200   # key=value overrides any config field
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dpshdl.dataset import TensorDataset
from torch import Tensor, nn

import mlfab


@dataclass(kw_only=True)
class Config(mlfab.Config):
    batch_size: int = mlfab.field(32, help="Number of digits in each batch")
    hidden_dim: int = mlfab.field(64, help="Channels of the convolutional layers")
    learning_rate: float = mlfab.field(3e-3, help="Peak learning rate")
    warmup_steps: int = mlfab.field(50, help="Linear warmup steps")
    max_steps: int | None = mlfab.field(600, help="Number of training steps")
    valid_every_n_steps: int | None = mlfab.field(100, help="Validate every N steps")
    valid_batches: int = mlfab.field(12, help="Validation batches (12 x 32 covers all 360 held-out digits)")
    valid_fraction: float = mlfab.field(0.2, help="Fraction of the digits held out for validation")


def load_digits_split(phase: mlfab.Phase, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 images (0..255) and int64 labels; a fixed shuffle splits train and valid."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    num_valid = int(len(labels) * valid_fraction)
    idx = order[:num_valid] if phase != "train" else order[num_valid:]
    return images[idx], labels[idx]


class DigitsClassification(mlfab.Task[Config]):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        h = config.hidden_dim
        self.model = nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(h * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def get_dataset(self, phase: mlfab.Phase) -> TensorDataset | torch.utils.data.TensorDataset:
        images, labels = load_digits_split(phase, self.config.valid_fraction)
        if phase == "train":
            return TensorDataset(images, labels)  # dpshdl: an endless stream of random samples
        return torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))  # map-style

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x_bhw, y_b = batch
        yhat_bc = self((x_bhw.float() / 255.0).unsqueeze(1))
        self.log_step(batch, yhat_bc, state)
        return F.cross_entropy(yhat_bc, y_b)

    def get_prediction(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """What `predict` returns: each digit's predicted class."""
        x_bhw, _ = batch
        return self((x_bhw.float() / 255.0).unsqueeze(1)).argmax(-1)

    def log_valid_step(self, batch: tuple[Tensor, Tensor], output: Tensor, state: mlfab.State) -> None:
        (x_bhw, y_b), yhat_bc = batch, output
        self.log_scalar("accuracy", lambda: (yhat_bc.argmax(-1) == y_b).float().mean())

        def get_label_strings() -> list[str]:
            ypred_b = yhat_bc.argmax(-1)
            return [f"ytrue={y_b[i]}, ypred={ypred_b[i]}" for i in range(len(y_b))]

        self.log_labeled_images("images", lambda: (x_bhw, get_label_strings()), max_images=16)


if __name__ == "__main__":
    DigitsClassification.launch(Config())
