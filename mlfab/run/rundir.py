"""Run directories: `<run_dir>/<snake_case task name>/run_<N>`, one per run, agreed on by every rank."""

import errno
import fcntl
import os
import re
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

from mlfab.checkpoints import intact_checkpoint, remove_stale_temporary_files
from mlfab.config import Config
from mlfab.errors import CheckpointError, ConfigError
from mlfab.run.distributed import EXP_DIR_ENV, PLACEHOLDER_PREFIX, env_rank_zero
from mlfab.run.slurm import in_slurm_job
from mlfab.settings import default_run_dir, load_settings


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def new_exp_dir(task_cls: type, config: Config) -> Path:
    """`<run_dir>/<snake_case task name>/run_<N>` with the next unused N, or `exp_dir` when given."""
    load_settings()  # Checked by every launch (a 0.2 value mlfab does not read stops it), not only where run_dir is.
    where = Path(config.exp_dir or config.run_dir or default_run_dir()).expanduser()
    try:
        if config.exp_dir:
            path = where
            path.mkdir(parents=True, exist_ok=True)
        else:
            root = where / snake_case(task_cls.__name__)
            root.mkdir(parents=True, exist_ok=True)
            taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
            n = max(taken, default=-1) + 1
            while True:  # Two launches at once: the one that creates the directory first gets it.
                path = root / f"run_{n}"
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    n += 1
    except OSError as e:
        key = "exp_dir" if config.exp_dir else "run_dir"
        raise ConfigError(
            f"Cannot create the run directory under {where} ({e.strerror}: {e.filename}). Set {key} "
            "to a directory you can write to."
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"The run directory {path} is not writable. Fix its permissions, or set run_dir or exp_dir "
            "to a directory you can write to."
        )
    return path.resolve()


def agreed_exp_dir(task_cls: type, config: Config) -> tuple[Path, bool]:
    """(run directory, whether this process writes its files): one directory for every rank of a run.

    Rank zero creates it and passes it on to the processes Lightning starts (through the environment);
    ranks started by torchrun, Slurm or by hand without `exp_dir` take rank zero's once the process
    group exists (`Task.setup`), and meanwhile write nothing."""
    if EXP_DIR_ENV in os.environ:
        return Path(os.environ[EXP_DIR_ENV]), False
    if not env_rank_zero():
        if config.exp_dir:
            return Path(config.exp_dir).expanduser().resolve(), False
        return Path(tempfile.mkdtemp(prefix=PLACEHOLDER_PREFIX)), False
    return new_exp_dir(task_cls, config), True


_held: dict[Path, int] = {}  # Run directories this process trains in: the open lock files that hold their locks.
LOCK_FILE = ".lock"
REQUEUED_WAIT_S = 120.0  # How long a Slurm job waits for the job it was requeued from to let go of the run.


def hold_run_dir(exp_dir: Path) -> None:
    """Takes the run's lock (a POSIX lock on `<exp_dir>/.lock`: the kernel lets go when the process ends, also when
    killed; processes it forks do not hold it; NFS servers keep it across machines) for this process's training in
    it; a second `fit` into the same run while one trains there is refused: both would write the same checkpoints
    and mix their logs. A Slurm job waits a while (the job it was requeued from may still be exiting). Where the file
    system has no locks, that is said, and nothing is held."""
    if exp_dir in _held:
        return
    fd = os.open(exp_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + (REQUEUED_WAIT_S if in_slurm_job() else 0.0)
    told = False
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held[exp_dir] = fd
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                print(
                    f"The run {exp_dir} cannot be locked ({e.strerror}): a second fit into it while this one trains "
                    "would not be refused.",
                    file=sys.stderr,
                    flush=True,
                )
                return
        if time.monotonic() >= deadline:
            os.close(fd)
            raise ConfigError(
                f"Another process is training in the run {exp_dir} (it holds {exp_dir / LOCK_FILE}): two fits into "
                "one run would overwrite each other's checkpoints and mix their logs. Wait for it to end (or stop "
                "it), or set exp_dir to another directory."
            )
        if not told:
            told = True
            print(f"Waiting for another process training in {exp_dir} to end ...", file=sys.stderr, flush=True)
        time.sleep(1.0)


def run_dirs_held() -> set[Path]:
    return set(_held)


def let_go_of_run_dirs(keep: Collection[Path] = ()) -> None:
    """Releases the locks `hold_run_dir` took, but those in `keep` (at the end of each launch: the ones a launch
    inside it took, not those of a fit it runs in)."""
    for exp_dir in [d for d in _held if d not in keep]:
        os.close(_held.pop(exp_dir))  # (Closing the file lets go of its lock.)


RUN_FILE_HEADER = "# mlfab run config of {}: the config and the Trainer arguments given explicitly."


def refuse_other_tasks_run(run: Path, task_cls: type, given: str) -> None:
    """A run (its config.yaml's first line names the task class) of another task is refused before anything reads
    its config, which would be refused key by key as if the task's Config had changed."""
    try:
        with (run / "config.yaml").open() as f:
            first = f.readline().rstrip("\n")
    except OSError:
        return
    prefix, _, suffix = RUN_FILE_HEADER.partition("{}")
    name = first.removeprefix(prefix).removesuffix(suffix)
    own = task_cls.__qualname__.rsplit(".", 1)[-1]  # The class's own name, as the checkpoint's check compares it:
    if first.startswith(prefix) and first.endswith(suffix) and name.rsplit(".", 1)[-1] != own:  # moved, it is one.
        raise CheckpointError(
            f"{given} is a run of {name}, not of {task_cls.__qualname__}: point it at a run of "
            f"{task_cls.__qualname__}, or start a new run."
        )


def checkpoint_run(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to, `<run>/checkpoints/<file>` with `<run>/config.yaml`, if it does."""
    ckpt = Path(ckpt_path).expanduser().resolve()
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def newest_checkpoint(exp_dir: Path, writer: bool | None = None) -> Path | None:
    """The checkpoint a relaunch into `exp_dir` resumes from: the most recently written one that is intact (its
    checksum matches); a damaged newer one is named and skipped. Called before every fit: the process that writes
    the run's files (`writer`; by default the one the launch environment makes rank zero, not one Lightning
    started) first removes the temporary files of saves that were killed."""
    ckpt_dir = exp_dir / "checkpoints"
    if writer is None:
        writer = EXP_DIR_ENV not in os.environ and env_rank_zero()
    if writer:
        remove_stale_temporary_files(ckpt_dir)
    return intact_checkpoint(ckpt_dir, announce=writer)
