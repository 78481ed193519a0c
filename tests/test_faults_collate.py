"""A collate that keeps failing stops the run (like samples that keep failing), and warnings that can repeat thousands
of times a second are rate-limited, in the main process and in dataloader workers."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlfab
from mlfab.data import BadSamples, Collate, RepeatedWarning
from mlfab.testing import BoringConfig, BoringTask, RegressionDataset
from tests.test_resume import PYTHONPATH


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def data_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mlfab.data"]


@pytest.mark.unit
def test_a_repeated_warning_is_logged_in_full_a_few_times_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    warn = RepeatedWarning("batches failed to collate", first_n=3, every_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="mlfab.data"):
        for i in range(100_000):  # 100000 failures over 5 minutes.
            clock.now = i * 0.003
            warn(f"failure {i}")
    lines = data_warnings(caplog)
    assert lines[:3] == ["failure 0", "failure 1", "failure 2 (from now on one line every 60 s counts them)"]
    counted = lines[3:]
    assert 4 <= len(counted) <= 5  # One line a minute.
    assert counted[0].startswith("20000 more batches failed to collate in the last 60 s (20003 in all); the last: ")
    assert sum(int(line.split()[0]) for line in counted) + 3 <= 100_000


@pytest.mark.unit
def test_a_collate_that_keeps_failing_stops_with_the_error_and_the_count(caplog: pytest.LogCaptureFixture) -> None:
    def collate(items: list) -> object:
        if items[0] == "bad":
            raise ValueError("ragged batch")
        return np.asarray(items, dtype=np.float32)

    collate_fn = Collate(collate, max_bad_in_a_row=5, name="Ragged")
    with caplog.at_level(logging.WARNING, logger="mlfab.data"):
        for _ in range(4):
            assert collate_fn(["bad"]) is None
        assert collate_fn([1.0, 2.0]).tolist() == [1.0, 2.0]  # A good batch starts the count again.
        for _ in range(4):
            assert collate_fn(["bad"]) is None
        with pytest.raises(mlfab.DatasetError) as info:  # The fifth in a row: max_bad_in_a_row=5.
            collate_fn(["bad"])
    message = str(info.value)
    assert "5 batches in a row from Ragged failed to collate (max_bad_samples_in_a_row=5, which also counts" in message
    assert "Last error: ValueError: ragged batch (at " in message and "test_faults_collate.py" in message
    lines = data_warnings(caplog)
    assert len(lines) == 3 and lines[0].startswith("Skipping a batch from Ragged that failed to collate: ValueError")


@pytest.mark.unit
def test_bad_samples_are_warned_about_a_few_times_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    bad = BadSamples("Flaky", max_in_a_row=None)
    bad.warning.clock = clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="mlfab.data"):
        for i in range(10_000):
            clock.now = i * 0.01
            try:
                raise OSError(f"cannot read sample {i}")
            except OSError as e:
                bad.failed(e)
    lines = data_warnings(caplog)
    assert lines[0].startswith("Skipping a sample from Flaky that failed to load: OSError: cannot read sample 0 (at ")
    assert len(lines) == 3 + 1  # 100 s: the first three, then one count.
    assert lines[3].startswith("6000 more samples from Flaky failed to load in the last 60 s (6003 in all); ")
    assert "most frequent: 6003 x OSError at " in lines[3]


class AlwaysRagged(RegressionDataset):
    def collate(self, items: list) -> object:
        raise ValueError("ragged batch")


class RaggedTask(BoringTask):
    def get_dataset(self, phase: mlfab.Phase) -> AlwaysRagged:
        return AlwaysRagged(self.config.in_dim)


@pytest.mark.integration
def test_an_endless_dataset_whose_collate_always_fails_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = BoringConfig(max_steps=5, max_bad_samples_in_a_row=3000, run_dir=str(tmp_path))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mlfab.data"), pytest.raises(mlfab.DatasetError) as info:
        RaggedTask.launch(config, argv=[])
    assert time.monotonic() - started < 60
    assert "3000 batches in a row from AlwaysRagged failed to collate (max_bad_samples_in_a_row=3000" in str(info.value)
    assert "ValueError: ragged batch" in str(info.value)
    assert len(data_warnings(caplog)) <= 3 + 1  # 3000 skipped batches, a handful of lines.


RAGGED = """
import sys
from mlfab.testing import BoringConfig
from tests.test_faults_collate import RaggedTask

if __name__ == "__main__":
    RaggedTask.launch(BoringConfig(max_steps=5), argv=sys.argv[1:])
"""


@pytest.mark.integration
def test_with_workers_a_collate_that_always_fails_stops_with_a_short_log(tmp_path: Path) -> None:
    """The issue's flood: 627,857 "Skipping a batch" lines in 90 s, and no end. Now each worker logs three and the
    run stops with the error once max_bad_samples_in_a_row batches in a row failed."""
    script = tmp_path / "ragged.py"
    script.write_text(RAGGED)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "MLFABRC_PATH": str(tmp_path / "home" / ".mlfab.yml")}
    args = ["num_dataloader_workers=2", "max_bad_samples_in_a_row=1000", f"exp_dir={tmp_path / 'run'}"]
    proc = subprocess.run(  # (The timeout is the "no end": it raises if the run does not stop by itself.)
        [sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-4000:]
    assert "1000 batches in a row from AlwaysRagged failed to collate (max_bad_samples_in_a_row=1000" in log
    skipping = [line for line in log.splitlines() if "Skipping a batch" in line]
    assert 1 <= len(skipping) <= 2 * 3, skipping  # At most three from each worker.
    assert all(line.startswith("[dataloader worker ") for line in skipping)
    assert len(log.splitlines()) < 300, log[-4000:]
