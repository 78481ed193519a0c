"""The parity benchmark's training variants, run for a few steps: they must keep running and train identically,
since the benchmark's speed ratios only mean something when every variant does the same work."""

import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[dict[str, ModuleType]]:
    """The scripts as modules, imported the way they import each other (benchmarks/ first on the path)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab")  # The scripts quiet these.
    levels = {name: logging.getLogger(name).level for name in names}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield {name: importlib.import_module(name) for name in ("parity", "logging_overhead", "resume_cost")}
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for name in ("parity", "logging_overhead", "resume_cost"):
            sys.modules.pop(name, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def parity(benchmarks: dict[str, ModuleType]) -> ModuleType:
    return benchmarks["parity"]


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


def test_the_logging_overhead_and_resume_cost_scripts_run(benchmarks: dict[str, ModuleType], tmp_path: Path) -> None:
    overhead = benchmarks["logging_overhead"]
    config = overhead.BoringConfig(max_steps=None, valid_every_n_steps=None)
    silent = overhead.Silent(config)
    assert overhead.seconds_per_step(silent, [], steps=3, warmup=2) > 0
    assert not any(silent._log_buffers.values())  # The baseline really keeps nothing.
    logged = overhead.BoringTask(config)
    assert overhead.seconds_per_step(logged, [overhead.mlfab.TensorboardLogger(tmp_path)], steps=3, warmup=2) > 0
    assert (tmp_path / "tensorboard" / "train").is_dir()

    resume = benchmarks["resume_cost"]
    resume.Timed.launch(resume.config(tmp_path / "run", 3), argv=[])
    assert resume.resume_seconds(tmp_path / "run", 3) > 0
