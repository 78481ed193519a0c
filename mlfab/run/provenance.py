"""Run provenance: record in each run directory where the run came from, so that it can be reproduced.

Layout under `<exp_dir>/provenance/`: `git.txt` (commit, branch, dirty flag, then the diff), `versions.yaml`,
`source/<file>` (a copy of the file defining the task) and `launches.yaml` (one entry per launch). Records are
never overwritten: a later launch whose git state, versions or source differ from every earlier record gets a
new numbered record beside the old ones (`git.2.txt`, `versions.2.yaml`, `source.2/`), and its launch entry
names the records it used. Call this from one process only (rank zero); it is not safe against concurrent writers.
"""

import importlib.metadata
import inspect
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mlfab.checkpoints import temporary_file

GIT_TIMEOUT_S = 5.0


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run git without a shell, stdin or prompts, so a misconfigured repo can never hang a training launch."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, encoding="utf-8", errors="replace", timeout=GIT_TIMEOUT_S, check=False,
    )  # fmt: skip


def git_info(path: str | Path) -> dict[str, Any] | None:
    """Commit, branch, dirty flag, diff and root of the repository holding `path` (a file or directory).

    None when git is missing or `path` is in no repository; other git failures give partial info with an
    "error" key, because provenance must never stop a run. `dirty` counts untracked files too: they may be
    imported by the task, so the run cannot be reproduced from the commit alone.
    """
    path = Path(path).absolute()
    cwd = path if path.is_dir() else path.parent
    try:
        top = _git(["rev-parse", "--show-toplevel"], cwd)
    except (OSError, subprocess.SubprocessError):  # git not installed, cwd gone, or timed out
        return None
    if top.returncode != 0:
        return None
    info: dict[str, Any] = {"commit": None, "branch": None, "dirty": False, "diff": "", "root": top.stdout.strip()}
    try:
        head = _git(["rev-parse", "--verify", "HEAD"], cwd)
        if head.returncode != 0:
            info["error"] = head.stderr.strip() or "no commit"
            return info
        info["commit"] = head.stdout.strip()
        branch = _git(["symbolic-ref", "--short", "-q", "HEAD"], cwd)  # fails when HEAD is detached
        info["branch"] = branch.stdout.strip() if branch.returncode == 0 else None
        diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], cwd)
        untracked = _git(["ls-files", "--others", "--exclude-standard", "-z"], cwd)
        if diff.returncode != 0 or untracked.returncode != 0:
            info["error"] = (diff.stderr + untracked.stderr).strip()
        names = [n for n in untracked.stdout.split("\0") if n]
        listed = "\n# Untracked files:\n" + "".join(f"#   {n}\n" for n in names) if names else ""
        info["diff"] = diff.stdout + listed
        info["dirty"] = bool(diff.stdout.strip() or names)
    except (OSError, subprocess.SubprocessError) as e:
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def versions() -> dict[str, str]:
    """Versions read from installed metadata, so recording them never imports (or fails on) the packages."""
    out = {"python": platform.python_version()}
    for name in ("torch", "lightning", "mlfab", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out | {"platform": platform.platform()}


def _source_file(task_cls: type) -> Path | None:
    try:
        file = inspect.getsourcefile(task_cls)
    except (TypeError, OSError):  # built-in, or defined in a module without a file (REPL, exec)
        return None
    return Path(file) if file is not None and os.path.isfile(file) else None


def task_source(task_cls: type) -> tuple[str, str] | None:
    """(file name, text) of the file defining `task_cls`; None for classes with no readable source file."""
    file = _source_file(task_cls)
    return (file.name, file.read_text(encoding="utf-8", errors="replace")) if file else None


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and `os.replace`, so a crash never leaves a half-written record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _numbered(stem: str, suffix: str, n: int) -> str:
    return f"{stem}{suffix}" if n == 1 else f"{stem}.{n}{suffix}"


def _record(prov: Path, stem: str, suffix: str, text: str, inner: str | None = None) -> str:
    """Name of an existing record identical to `text`, else of a new `<stem>.<n><suffix>` holding it.

    With `inner`, records are directories (`source/`, `source.2/`) holding a file of that name."""
    n = 1
    while (prov / (name := _numbered(stem, suffix, n))).exists():
        target = prov / name / inner if inner else prov / name
        if target.is_file() and target.read_text(encoding="utf-8", errors="replace") == text:
            return name
        n += 1
    atomic_write(prov / name / inner if inner else prov / name, text)
    return name


def _git_text(info: dict[str, Any] | None, where: Path) -> str:
    if info is None:
        return f"The task is not in a git repository (or git is unavailable): {where}\n"
    lines = [f"commit: {info['commit']}", f"branch: {info['branch'] or '(detached)'}",
             f"dirty: {str(info['dirty']).lower()}", f"root: {info['root']}"]  # fmt: skip
    if "error" in info:
        lines.append(f"error: {info['error']}")
    return "\n".join(lines) + "\n\n" + info["diff"]


def _read_launches(path: Path, move_aside: bool) -> list[Any]:
    """Earlier launches; with `move_aside`, an unreadable file is renamed (never overwritten) and the list restarts."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else []
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if isinstance(data, list):
        return data
    if move_aside:
        os.replace(path, path.with_name(f"launches.corrupt.{datetime.now(UTC):%Y%m%dT%H%M%S%f}.yaml"))
    return []


def write_provenance(
    exp_dir: Path,
    task_cls: type,
    *,
    resumed_from: Path | str | None = None,
    config: str | None = None,
    subcommand: str = "fit",
) -> Path:
    """Record this launch under `<exp_dir>/provenance/` and return that directory. `config` is the launch's
    config.yaml text, kept as a record so that earlier launches' settings stay in the history; `subcommand` says
    what it did (`fit`, or `validate` / `test` / `predict` of one of the run's checkpoints); `resumed_from` the
    checkpoint a `fit` went on from.

    The git state is that of the repository holding the task's source file (the working directory when the
    task has no file), since that is the code that runs.
    """
    prov = Path(exp_dir) / "provenance"
    prov.mkdir(parents=True, exist_ok=True)
    source = task_source(task_cls)
    where = _source_file(task_cls) or Path.cwd()
    info = git_info(where)
    vers = versions()
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "subcommand": subcommand,
        "resumed": resumed_from is not None,
        "resumed_from": str(Path(resumed_from).resolve()) if resumed_from is not None else None,
        "argv": list(sys.argv),
        "host": socket.gethostname(),
        "commit": info["commit"] if info else None,
        "versions": vers,
        "git_record": _record(prov, "git", ".txt", _git_text(info, where)),
        "versions_record": _record(prov, "versions", ".yaml", yaml.safe_dump(vers, sort_keys=False)),
        "source_record": f"{_record(prov, 'source', '', source[1], source[0])}/{source[0]}" if source else None,
        "config_record": _record(prov, "config", ".yaml", config) if config is not None else None,
    }
    launches = _read_launches(prov / "launches.yaml", move_aside=True)
    launches.append(entry)
    atomic_write(prov / "launches.yaml", yaml.safe_dump(launches, sort_keys=False))
    return prov


def launch_count(exp_dir: Path) -> int:
    """How many launches the run's `launches.yaml` records (0 without a readable one)."""
    return len(_read_launches(Path(exp_dir) / "provenance" / "launches.yaml", move_aside=False))


def trained_before(exp_dir: Path) -> bool:
    """Whether an earlier launch of the run trained it (a `fit`; records without a subcommand are fits)."""
    launches = _read_launches(Path(exp_dir) / "provenance" / "launches.yaml", move_aside=False)
    return any(isinstance(e, dict) and e.get("subcommand", "fit") == "fit" for e in launches)


def rewound_at(exp_dir: Path, checkpoint: Path | str) -> float | None:
    """When the latest `fit` of the run that went on from `checkpoint` started (a rewind to it, or the run's start
    from it), as a POSIX time; None when none did."""
    launches = _read_launches(Path(exp_dir) / "provenance" / "launches.yaml", move_aside=False)
    path = str(Path(checkpoint).resolve())
    times = [e.get("time") for e in launches if isinstance(e, dict) and e.get("resumed_from") == path]
    return max((_timestamp(t) for t in times), default=None)


def _timestamp(value: Any) -> float:
    """A launch's recorded time (ISO text; a datetime where YAML parsed it as one); 0 where unreadable."""
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return 0.0
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def provenance_text(exp_dir: Path) -> str:
    """A few lines about the latest launch (commit, branch, dirty, versions, launch count) for text loggers."""
    prov = Path(exp_dir) / "provenance"
    launches = _read_launches(prov / "launches.yaml", move_aside=False)
    if not launches:
        return f"No provenance recorded in {prov}."
    last = launches[-1] if isinstance(launches[-1], dict) else {}
    git_file = prov / str(last.get("git_record") or "git.txt")
    head = git_file.read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[0] if git_file.is_file() else ""
    fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    if "commit" in fields:
        git_line = f"commit {fields['commit']} on {fields.get('branch', '?')}, dirty: {fields.get('dirty', '?')}"
    else:
        git_line = head.strip() or "git: not recorded"
    vers = last.get("versions") or {}
    vers_line = ", ".join(f"{k} {v}" for k, v in vers.items()) if isinstance(vers, dict) else str(vers)
    return f"{git_line}\nversions: {vers_line}\nlaunches: {len(launches)}\n"
