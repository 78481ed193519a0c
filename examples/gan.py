"""A GAN on scikit-learn's 8x8 digits, offline, in well under a minute on 2 CPU cores.

python -m examples.gan                  # generated digits under value/generated in TensorBoard
python -m examples.gan max_steps=300

Two networks trained against each other with one optimizer: `get_loss` returns both losses, summed for one
backward pass, and `mlfab.detached_call` runs the discriminator on the generated images with its parameters
detached, so the generator's loss trains only the generator and the discriminator's loss (on detached images) only
the discriminator. Each network gets its own learning rate through parameter groups (both use Adam's betas
(0.5, 0.999)). mlfab's clipping,
non-finite checks, loss logging, sample counts, `max_steps` (one step per batch) and exact resume apply as for any
task.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dpshdl.dataset import TensorDataset
from torch import Tensor, nn

import mlfab
from examples.digits import load_digits_split


@dataclass(kw_only=True)
class Config(mlfab.Config):
    batch_size: int = mlfab.field(64, help="Real digits per batch")
    latent_dim: int = mlfab.field(16, help="Size of the generator's noise input")
    hidden_dim: int = mlfab.field(128, help="Width of both networks")
    generator_lr: float = mlfab.field(1e-3, help="Generator learning rate")
    discriminator_lr: float = mlfab.field(4e-4, help="Discriminator learning rate (slower, so neither side wins)")
    max_steps: int | None = mlfab.field(800, help="Training steps")
    valid_every_n_steps: int | None = mlfab.field(50, help="Validate every N steps")
    valid_batches: int = mlfab.field(4, help="Validation batches")
    clip_grad_norm: float | None = mlfab.field(None, help="No clipping: the two networks' gradients differ in scale")


class DigitsGan(mlfab.Task[Config]):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        h, z = config.hidden_dim, config.latent_dim
        self.generator = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 64))
        self.discriminator = nn.Sequential(
            nn.Linear(64, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1)
        )

    def get_dataset(self, phase: mlfab.Phase) -> TensorDataset | torch.utils.data.TensorDataset:
        images, _ = load_digits_split(phase, valid_fraction=0.2)
        images = (images.astype(np.float32) / 127.5 - 1.0).reshape(len(images), 64)  # [-1, 1]
        if phase == "train":
            return TensorDataset(images)  # dpshdl: an endless stream of random digits
        return torch.utils.data.TensorDataset(torch.from_numpy(images))

    def build_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adam(
            [
                {"params": self.generator.parameters(), "lr": c.generator_lr},
                {"params": self.discriminator.parameters(), "lr": c.discriminator_lr},
            ],
            betas=(0.5, 0.999),
        )

    def forward(self, num: int) -> Tensor:
        """`num` generated digits, (num, 64) in [-1, 1]."""
        noise = torch.randn(num, self.config.latent_dim, device=self.device)
        return torch.tanh(self.generator(noise))

    def get_loss(self, batch: tuple[Tensor] | Tensor, state: mlfab.State) -> dict[str, Tensor]:
        real = batch[0] if isinstance(batch, tuple | list) else batch
        fake = self(len(real))
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        ones, zeros = torch.ones_like(real_logits), torch.zeros_like(fake_logits)
        discriminator_loss = F.binary_cross_entropy_with_logits(torch.cat([real_logits, fake_logits]),
                                                                torch.cat([ones, zeros]))  # fmt: skip
        # The generator's loss through the discriminator, whose parameters it must not train.
        generator_loss = F.binary_cross_entropy_with_logits(mlfab.detached_call(self.discriminator, fake), ones)
        accuracy = torch.cat([real_logits > 0, fake_logits < 0]).float().mean()
        self.log_scalar("discriminator_accuracy", lambda: accuracy)  # 0.5: it cannot tell real from generated.
        # How far the average generated digit is from the average real one (RMS over the 64 pixels).
        self.log_scalar("mean_image_distance", lambda: (fake.mean(0) - real.mean(0)).pow(2).mean().sqrt())
        if state.phase == "valid":
            self.log_images("generated", lambda: (fake[:16].detach().reshape(-1, 8, 8) + 1) / 2, max_images=16)
        return {"discriminator": discriminator_loss, "generator": generator_loss}


if __name__ == "__main__":
    DigitsGan.launch(Config())
