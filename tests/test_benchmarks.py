"""The benchmark scripts, run for a few steps. The parity benchmark's training variants must keep running and train
identically, since its speed ratios only mean something when every variant does the same work; the other two
scripts must time what they say they time and print a report whose numbers parse and agree with each other."""

import importlib
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mlfab.testing import read_scalars

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[dict[str, ModuleType]]:
    """The scripts as modules, imported the way they import each other (benchmarks/ first on the path)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab")  # The scripts quiet these.
    levels = {name: logging.getLogger(name).level for name in names}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        names = ("parity", "logging_overhead", "resume_cost", "checkpoint_checksum")
        yield {name: importlib.import_module(name) for name in names}
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


def run_main(
    script: ModuleType, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """What `python benchmarks/<script>.py <args>` prints."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *args])
    capsys.readouterr()
    script.main()
    return capsys.readouterr().out


def number(pattern: str, text: str) -> float:
    """The number the pattern's group captures from the script's output; finite, or the report is broken."""
    match = re.search(pattern, text, flags=re.M)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    value = float(match.group(1))
    assert math.isfinite(value), match.group(0)
    return value


def test_the_logging_overhead_timings_cover_only_the_timed_steps(
    benchmarks: dict[str, ModuleType], tmp_path: Path
) -> None:
    overhead = benchmarks["logging_overhead"]
    config = overhead.BoringConfig(max_steps=None, valid_every_n_steps=None)
    silent, logged = overhead.Silent(config), overhead.BoringTask(config)
    for task, loggers in ((silent, []), (logged, [overhead.mlfab.TensorboardLogger(tmp_path)])):
        start = time.perf_counter()
        per_step = overhead.seconds_per_step(task, loggers, steps=3, warmup=2)
        wall = time.perf_counter() - start
        # A timer that never started (or stopped) would give nonsense far outside the call that ran the steps.
        assert 0 < per_step * 3 < wall
    assert not any(silent._log_buffers.values())  # The baseline really keeps nothing ...
    assert read_scalars(tmp_path / "tensorboard" / "train")["loss/loss"]  # ... and the logged run wrote its loss.


def test_the_logging_overhead_script_reports_both_timings_and_their_ratio(
    benchmarks: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_main(benchmarks["logging_overhead"], ["--steps", "5", "--repeats", "1"], monkeypatch, capsys)
    assert "steps per run: 5, repeats: 1 (medians)" in out
    without = number(r"^no logging: +([-\d.]+) ms/step$", out)
    with_logs = number(r"^loss logged every step: +([-\d.]+) ms/step$", out)
    assert without > 0 and with_logs > 0
    overhead = number(r"^overhead: +([-+\d.]+) ms/step \(target <= 0\.100\)$", out)
    assert overhead == pytest.approx(with_logs - without, abs=0.0015)  # Each printed to 0.001 ms.
    ratio = number(r"^ratio logged / not logged: ([-\d.]+)$", out)
    assert ratio == pytest.approx(with_logs / without, rel=0.01, abs=0.002)


def test_the_resume_cost_timing_is_of_a_resumed_run(benchmarks: dict[str, ModuleType], tmp_path: Path) -> None:
    import torch

    resume = benchmarks["resume_cost"]
    resume.Timed.launch(resume.config(tmp_path / "run", 3), argv=[])
    start = time.perf_counter()
    seconds = resume.resume_seconds(tmp_path / "run", 3)
    assert 0 < seconds < time.perf_counter() - start
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # One step past the checkpoint ...
    launches = (tmp_path / "run" / "provenance" / "launches.yaml").read_text()
    assert launches.count("resumed: true") == 1  # ... taken by resuming it, not by training from scratch.


def test_the_resume_cost_script_reports_a_row_per_step_and_their_ratio(
    benchmarks: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_main(benchmarks["resume_cost"], ["--steps", "20", "--repeats", "1"], monkeypatch, capsys)
    assert out.count("Resuming from ") == 2  # Each timed launch resumed its run.
    assert "| resumed at step | time to train there (s) | launch -> first resumed step (s, median of 1) |" in out
    rows = {}
    for steps in (10, 20):
        train = number(rf"^\| {steps} \| ([\d.]+) \| [\d.]+ \|$", out)
        rows[steps] = number(rf"^\| {steps} \| [\d.]+ \| ([\d.]+) \|$", out)
        assert train > 0 and rows[steps] > 0
    ratio = number(r"^ratio \(step 20 / step 10\): ([\d.]+) \(1\.0 = no cost for steps trained\)$", out)
    assert ratio == pytest.approx(rows[20] / rows[10], rel=0.01, abs=0.01)


def test_checkpoint_checksum_benchmark_saves_both_ways_and_reports_the_ratio(
    benchmarks: dict[str, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    base, ours = benchmarks["checkpoint_checksum"].main(tmp_path, repeats=1, tensors=1)
    assert 0 < base and 0 < ours
    out = capsys.readouterr().out
    assert f"ratio {ours / base:.2f}x" in out
    # The measured save is mlfab's: its checksum file names the bytes that were written.
    digest = hashlib.sha256((tmp_path / "mlfab.ckpt").read_bytes()).hexdigest()
    assert (tmp_path / "mlfab.ckpt.sha256").read_text().split()[0] == digest
    assert not (tmp_path / "unhashed.ckpt.sha256").exists()
