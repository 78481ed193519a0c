import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "offline"  # Whatever the environment says: no test may wait on W&B's servers.


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own settings file, run directory and working directory (never the real home)."""
    monkeypatch.setenv("MLFABRC_PATH", str(tmp_path / "home" / ".mlfab.yml"))
    for var in ("RUN_DIR", "DATA_DIR", "MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


TIERS = ("unit", "integration", "slow")  # The markers in pyproject.toml; `-m unit` runs the quick tier.


@pytest.hookimpl(tryfirst=True)  # Before `-m` deselects: a test without a tier would just never run.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has exactly one tier marker (a module's `pytestmark` or its own), so `-m` selects each test once."""
    problems = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            found = ", ".join(tiers) if tiers else "none"
            problems.append(f"{item.nodeid}: {found}")
    if problems:
        raise pytest.UsageError(
            f"Each test needs exactly one tier marker of {', '.join(TIERS)} (pytestmark = pytest.mark.<tier> "
            "for the file, or @pytest.mark.<tier> on the test where the file has none). Found:\n  "
            + "\n  ".join(problems)
        )
