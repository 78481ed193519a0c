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
