"""Tests for `mlfab.run.provenance`, against throwaway git repositories made inside tmp_path."""

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from mlfab.run import provenance
from mlfab.run.provenance import git_info, provenance_text, task_source, versions, write_provenance

pytestmark = pytest.mark.unit

TASK_SOURCE = "class MyTask:\n    lr = 0.1\n"


@pytest.fixture(autouse=True)
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's git config out, and stop repository discovery at tmp_path (it may sit inside a repo)."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def load_task(file: Path, monkeypatch: pytest.MonkeyPatch) -> type:
    """Import `file` as a fresh module (registered in sys.modules, as inspect needs) and return its MyTask."""
    name = f"prov_task_{abs(hash(str(file)))}"
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module.MyTask


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "task_mod.py").write_text(TASK_SOURCE)
    git(repo, "add", "task_mod.py")
    git(repo, "commit", "-q", "-m", "init")
    return repo


@pytest.fixture
def task(repo: Path, monkeypatch: pytest.MonkeyPatch) -> type:
    return load_task(repo / "task_mod.py", monkeypatch)


def launches(prov: Path) -> list[dict]:
    return yaml.safe_load((prov / "launches.yaml").read_text())


def test_git_info_clean_repo(repo: Path) -> None:
    for where in (repo, repo / "task_mod.py"):
        info = git_info(where)
        assert info is not None
        assert info["commit"] == git(repo, "rev-parse", "HEAD")
        assert info["branch"] == "main"
        assert info["dirty"] is False
        assert info["diff"] == ""
        assert Path(info["root"]).resolve() == repo.resolve()
        assert "error" not in info


def test_git_info_detached_head_has_no_branch(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    info = git_info(repo)
    assert info is not None and info["branch"] is None
    assert info["commit"] == git(repo, "rev-parse", "HEAD")


def test_git_info_dirty_diff_has_staged_and_unstaged_edits(repo: Path) -> None:
    (repo / "other.py").write_text("a = 1\n")
    git(repo, "add", "other.py")  # staged, not committed
    (repo / "task_mod.py").write_text(TASK_SOURCE + "    edited = 42\n")  # unstaged
    info = git_info(repo)
    assert info is not None and info["dirty"] is True
    assert "+    edited = 42" in info["diff"]
    assert "+a = 1" in info["diff"]


def test_git_info_lists_untracked_files(repo: Path) -> None:
    (repo / "notes_untracked.txt").write_text("hello\n")
    info = git_info(repo)
    assert info is not None and info["dirty"] is True
    assert "notes_untracked.txt" in info["diff"]


def test_outside_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "task_mod.py").write_text(TASK_SOURCE)
    assert git_info(plain) is None
    prov = write_provenance(tmp_path / "run", load_task(plain / "task_mod.py", monkeypatch))
    assert "not in a git repository" in (prov / "git.txt").read_text()
    assert launches(prov)[0]["commit"] is None


def test_git_missing_from_path(repo: Path, task: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert git_info(repo) is None
    prov = write_provenance(tmp_path / "run", task)
    assert "not in a git repository" in (prov / "git.txt").read_text()


def test_git_timeout_gives_none(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*args: object, **kwargs: object) -> None:
        raise subprocess.TimeoutExpired("git", provenance.GIT_TIMEOUT_S)

    monkeypatch.setattr(provenance.subprocess, "run", hang)
    assert git_info(repo) is None


def test_versions() -> None:
    v = versions()
    assert set(v) == {"python", "torch", "lightning", "mlfab", "numpy", "platform"}
    assert v["torch"] == torch.__version__
    assert v["python"] == platform.python_version()
    assert v["platform"] == platform.platform()


def test_versions_unknown_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(provenance.importlib.metadata, "version", missing)
    assert versions()["lightning"] == "unknown"


def test_task_source(repo: Path, task: type) -> None:
    assert task_source(task) == ("task_mod.py", TASK_SOURCE)


def test_task_source_none_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("prov_interactive")  # like a REPL session: no __file__
    monkeypatch.setitem(sys.modules, "prov_interactive", module)
    exec("class MyTask:\n    pass\n", module.__dict__)
    assert task_source(module.MyTask) is None
    assert task_source(int) is None


def test_write_provenance_layout(repo: Path, task: type, tmp_path: Path) -> None:
    prov = write_provenance(tmp_path / "run", task)
    assert prov == tmp_path / "run" / "provenance"
    sha = git(repo, "rev-parse", "HEAD")
    git_txt = (prov / "git.txt").read_text()
    assert f"commit: {sha}" in git_txt and "branch: main" in git_txt and "dirty: false" in git_txt
    assert yaml.safe_load((prov / "versions.yaml").read_text()) == versions()
    assert (prov / "source" / "task_mod.py").read_text() == (repo / "task_mod.py").read_text()
    [entry] = launches(prov)
    assert entry["resumed"] is False
    assert entry["argv"] == sys.argv
    assert entry["commit"] == sha
    assert entry["versions"] == versions()
    assert isinstance(entry["host"], str) and entry["host"]
    assert entry["time"].endswith("+00:00")


def test_resume_appends_and_keeps_first_launch(repo: Path, task: type, tmp_path: Path) -> None:
    prov = write_provenance(tmp_path / "run", task)
    first = launches(prov)[0]
    git_before = (prov / "git.txt").read_bytes()
    write_provenance(tmp_path / "run", task, resumed_from=tmp_path / "run" / "checkpoints" / "last.ckpt")
    both = launches(prov)
    assert len(both) == 2
    assert both[0] == first
    assert both[1]["resumed"] is True
    assert (prov / "git.txt").read_bytes() == git_before
    # Nothing changed, so no second copies.
    assert sorted(p.name for p in prov.iterdir()) == ["git.txt", "launches.yaml", "source", "versions.yaml"]
    assert [p.name for p in (prov / "source").iterdir()] == ["task_mod.py"]


def test_resume_with_changed_source_keeps_both(repo: Path, task: type, tmp_path: Path) -> None:
    prov = write_provenance(tmp_path / "run", task)
    git_before = (prov / "git.txt").read_text()
    changed = TASK_SOURCE + "    lr_changed = 0.2\n"
    (repo / "task_mod.py").write_text(changed)
    write_provenance(tmp_path / "run", task, resumed_from=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (prov / "source" / "task_mod.py").read_text() == TASK_SOURCE
    assert (prov / "source.2" / "task_mod.py").read_text() == changed
    assert (prov / "git.txt").read_text() == git_before
    assert "+    lr_changed = 0.2" in (prov / "git.2.txt").read_text()
    entries = launches(prov)
    assert [e["source_record"] for e in entries] == ["source/task_mod.py", "source.2/task_mod.py"]
    assert [e["git_record"] for e in entries] == ["git.txt", "git.2.txt"]


def test_unreadable_launches_file_is_kept(task: type, tmp_path: Path) -> None:
    prov = tmp_path / "run" / "provenance"
    prov.mkdir(parents=True)
    (prov / "launches.yaml").write_text("{not: [valid yaml")
    write_provenance(tmp_path / "run", task)
    assert len(launches(prov)) == 1
    [aside] = prov.glob("launches.corrupt.*.yaml")
    assert aside.read_text() == "{not: [valid yaml"


def test_provenance_text(repo: Path, task: type, tmp_path: Path) -> None:
    assert "No provenance" in provenance_text(tmp_path / "run")
    write_provenance(tmp_path / "run", task)
    write_provenance(tmp_path / "run", task, resumed_from=tmp_path / "run" / "checkpoints" / "last.ckpt")
    text = provenance_text(tmp_path / "run")
    assert git(repo, "rev-parse", "HEAD") in text
    assert "main" in text and "dirty: false" in text
    assert f"torch {torch.__version__}" in text
    assert "launches: 2" in text
