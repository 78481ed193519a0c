"""benchmarks/checkpoint_stall.py runs and reports the blocking time of a save against a plain step."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_checkpoint_stall_benchmark_reports_save_and_step_times(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "checkpoint_stall.py"
    args = [sys.executable, str(script), "--params-millions", "0.01", "--steps", "6", "--every", "2", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = re.search(r"training step without a save: ([\d.]+) s", proc.stdout)
    save = re.search(r"a save blocks training for:\s+([\d.]+) s \(median of (\d+)\), ([\d.]+) steps", proc.stdout)
    assert step and save, proc.stdout
    assert int(save.group(2)) == 4  # Steps 2, 4, 6 and last.ckpt.
    assert float(save.group(1)) > 0 and float(step.group(1)) > 0  # Timings this small make the ratio rounding noise.
