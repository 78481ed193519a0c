"""The parity benchmark's training variants, run for a few steps: they must keep running and train identically,
since the benchmark's speed ratios only mean something when every variant does the same work."""

import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity"] = module  # The dataclasses in it look their module up.
    spec.loader.exec_module(module)
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab")  # The script quiets these.
    levels = {name: logging.getLogger(name).level for name in names}
    yield module
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    del sys.modules["parity"]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_variant_trains_exactly_like_the_raw_loop(parity: ModuleType, model: str, tmp_path: Path) -> None:
    variants = ("raw", "bare", "lean", "lean_manual", "lightning", "mlfab") if model == "mlp" else parity.VARIANTS
    losses = {v: parity.train(v, model, 4, 2, tmp_path / v).losses for v in variants}
    assert len(losses["raw"]) == 6
    for variant, curve in losses.items():
        assert curve == pytest.approx(losses["raw"], abs=parity.LOSS_TOLERANCE), variant
    assert losses["raw"][-1] < losses["raw"][0]  # They train, not just agree.


def test_the_seed_cnn_in_the_benchmark_is_the_seed_examples_model(parity: ModuleType) -> None:
    parity.check_seed_cnn()  # Exits with a message when examples/mnist.py's model changed.
