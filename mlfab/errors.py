"""Errors a user can cause. Each message says what happened, why, and how to fix it.

A program that meets one (`Task.launch` and the `mlfab` script, run from the command line) prints it with `report`:
`error: <message>` and an exit status, 2 for a usage error (something to fix before running again: the config,
a setting, the task's code, Slurm options) and 1 for a run that failed (its data, a checkpoint, a non-finite loss).
"""

import datetime
import os
import shlex
import sys
import traceback
from pathlib import Path


class MlfabError(Exception):
    """Base class of mlfab's user-facing errors."""


class ConfigError(MlfabError, ValueError):
    """A config key, value or file is wrong."""


class SettingsError(MlfabError):
    """A user setting (`~/.mlfab.yml` or its environment variables) is missing or wrong."""


class TaskDefinitionError(MlfabError, TypeError):
    """A Task subclass is declared or implemented in a way mlfab cannot use."""


class DatasetError(MlfabError):
    """`get_dataset` failed or returned something that is not a dataset."""


class CheckpointError(MlfabError):
    """A checkpoint cannot be written, read, or used for this task."""


class NonFiniteError(MlfabError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SlurmError(MlfabError):
    """Submitting to Slurm failed, or a Slurm setting is wrong."""


USAGE_ERRORS = (ConfigError, SettingsError, TaskDefinitionError, SlurmError)
TRACEBACK_ENV = "MLFAB_TRACEBACK"  # Set to 1 to see the traceback of a user error too.
ERRORS_LOG = Path("logs") / "errors.log"  # In the run directory: the traceback of each user error, appended.


def exit_code(error: MlfabError) -> int:
    """2 for a usage error, 1 for a run that failed."""
    return 2 if isinstance(error, USAGE_ERRORS) else 1


def report(error: MlfabError, run_dir: Path | None = None) -> int:
    """Prints a user error as `error: <message>` on stderr (after its traceback when MLFAB_TRACEBACK=1), appends
    the traceback to `<run_dir>/logs/errors.log` when the run has a directory, and returns the exit status."""
    text = "".join(traceback.format_exception(error))
    logged = _append_to_log(run_dir / ERRORS_LOG, text) if run_dir is not None else None
    sys.stdout.flush()
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        sys.stderr.write(text)
    where = f"\n(traceback in {logged})" if logged is not None else ""
    notes = "".join(f"\n{note}" for note in getattr(error, "__notes__", ()))  # What mlfab added on its way up.
    print(f"error: {_message(error)}{notes}{where}", file=sys.stderr, flush=True)
    return exit_code(error)


def _message(error: MlfabError) -> str:
    """The error's message; for one a DataLoader worker raised, which torch raises again in the main process with the
    worker's whole traceback as its message, the original message and which worker (the traceback goes to the log)."""
    text = str(error)
    head, original, _ = text.partition("\nOriginal Traceback")
    at = text.rfind(name := f"{type(error).__module__}.{type(error).__qualname__}: ")
    if not (original and head.startswith("Caught ") and at >= 0):
        return text
    return f"{text[at + len(name) :].strip()} ({head.removeprefix(f'Caught {type(error).__name__} ').rstrip('.')})"


def _append_to_log(path: Path, text: str) -> Path | None:
    """Appends a traceback, with when and what ran, to `path`; None when it cannot be written (never raises)."""
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"--- {when}, pid {os.getpid()}: {shlex.join(sys.argv)}\n{text}\n")
    except OSError:
        return None
    return path
