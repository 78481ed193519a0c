"""examples/gan.py: two networks trained against each other through one optimizer learn (#14)."""

from pathlib import Path

import pytest

from examples.gan import Config, DigitsGan
from mlfab.testing import read_scalars


@pytest.mark.integration
def test_the_gan_learns(tmp_path: Path) -> None:
    DigitsGan.launch(Config(max_steps=400, exp_dir=str(tmp_path / "run")), use_cli=False)
    valid = read_scalars(tmp_path / "run" / "tensorboard" / "valid")
    accuracy = [v for _, v in valid["value/discriminator_accuracy"]]
    distance = [v for _, v in valid["value/mean_image_distance"]]
    assert [s for s, _ in valid["loss/generator"]] == [1, *range(50, 401, 50)]
    # The discriminator learns to tell generated digits from real ones, then the generator catches up.
    assert abs(accuracy[0] - 0.5) < 0.1 and max(accuracy) > 0.8
    first_win = next(i for i, a in enumerate(accuracy) if a > 0.8)
    assert min(accuracy[first_win:]) < 0.75
    # The average generated digit comes closer to the average real one (0.68 -> 0.45-0.50 RMS here).
    assert min(distance[-3:]) < 0.8 * distance[0]


@pytest.mark.unit
def test_detached_call_passes_gradients_to_the_inputs_only() -> None:
    import torch
    from torch import nn

    import mlfab

    critic, x = nn.Linear(3, 1), torch.ones(2, 3, requires_grad=True)
    mlfab.detached_call(critic, x).sum().backward()
    assert critic.weight.grad is None and critic.bias.grad is None
    assert torch.equal(x.grad, critic.weight.detach().expand(2, 3))  # type: ignore[arg-type]
