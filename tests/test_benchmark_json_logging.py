"""benchmarks/json_logging.py, run for a few steps: both variants train, count what they evaluate and write, and the
printed ratio agrees with the printed timings."""

import importlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def json_logging() -> Iterator[ModuleType]:
    """The script as a module, imported as it runs (benchmarks/ first on the path); the loggers it quiets restored."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab")
    levels = {name: logging.getLogger(name).level for name in names}
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("json_logging")
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("json_logging", None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_json_logging_benchmark_reports_both_variants_and_their_ratio(
    json_logging: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["json_logging.py", "--steps", "5", "--repeats", "1", "--image"])
    json_logging.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^JsonLogger (.+?): +([\d.]+) ms/step, (\d+) lazy evaluations, (\d+) lines$", out, flags=re.M)
    assert [name for name, *_ in rows] == ["every step", "default (2 s)"], out
    (_, every, every_evals, every_lines), (_, default, default_evals, _) = rows
    assert (int(every_evals), int(every_lines)) == (105, 106)  # 5 steps + 100 warmup, each a line (+ hparams).
    assert int(default_evals) < 105  # The default writes far fewer steps (the first, then every 2 s).
    ratio = re.search(r"^ratio every step / default: ([\d.]+)$", out, flags=re.M)
    assert ratio and float(ratio.group(1)) == pytest.approx(float(every) / float(default), rel=0.01, abs=0.002)
