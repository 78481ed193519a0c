"""Checkpoint files: atomic writes, a checksum beside each, clear errors for unreadable ones, and checking one fits
the task.

Lightning's own atomic save writes its temporary file in the system temp directory and moves it, which
is a copy (not an atomic rename) when that directory is on another filesystem. mlfab writes the temporary
file next to the checkpoint, fsyncs it and renames it, so a process killed mid-save never leaves a broken
newest checkpoint, and a failed save (disk full) leaves the previous ones untouched.

Each checkpoint gets `<name>.sha256` beside it (`sha256sum -c` reads it), hashed from the bytes as torch writes
them (no second read), written atomically after the checkpoint and removed with it. Loading checks it; a
checkpoint without one (an older run's) loads unchecked. A temporary file left by a process killed while saving
is removed when the next run in the directory starts.
"""

import errno
import hashlib
import os
import pickle
import re
import secrets
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from mlfab._lightning import collect_rng_states, set_rng_states
from mlfab.errors import CheckpointError

CHECKSUM_SUFFIX = ".sha256"
# When this process began (near enough: when mlfab's checkpoint code was imported). A temporary file not modified
# since then was left by a process that is gone: see `remove_stale_temporary_files`.
PROCESS_START = time.time()
# What torch's zip writer raises when the file under it fails (ENOSPC included): it swallows the OSError.
TORCH_WRITE_FAILURE = ("inline_container.cc", "PytorchStreamWriter")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic saves with a checksum file, checked loads, and `keep_last`: {file name prefix: N} keeps the newest N
    periodic checkpoints of each cadence (`step_00000010.ckpt`: prefix "step_") in the directory after each save,
    whatever an earlier launch left (Lightning's ModelCheckpoint counts only the files of its own session and never
    deletes the one it resumed from)."""

    def __init__(self, keep_last: dict[str, int] | None = None) -> None:
        super().__init__()
        self.keep_last = {prefix: n for prefix, n in (keep_last or {}).items() if n > 0}
        self._cleaned: set[Path] = set()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in self._cleaned:  # Also where no run start looked (a --ckpt_path from elsewhere).
            self._cleaned.add(path.parent)
            remove_stale_temporary_files(path.parent)
        fd, tmp = temporary_file(path)
        writer: HashingWriter | None = None
        try:
            with os.fdopen(fd, "wb") as f:
                writer = HashingWriter(f)
                torch.save(checkpoint, cast(IO[bytes], writer))
                f.flush()
                os.fsync(f.fileno())
            # A killed process may leave the new checkpoint without a checksum (it loads unchecked), never beside
            # the old one's (which would make it look corrupt).
            checksum_path(path).unlink(missing_ok=True)
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            failure = write_failure(e, writer)
            if failure is not None:
                raise save_error(path, checkpoint, failure, writer) from e
            raise
        digest = writer.sha256.hexdigest()
        write_checksum(path, digest)
        sync_directory(path.parent)
        remember("sha256", path, digest)
        if isinstance(saved := checkpoint.get("mlfab", {}).get("saved_at"), float):
            remember("saved_at", path, saved)
        self._prune(path)

    def _prune(self, path: Path) -> None:
        for prefix, n in self.keep_last.items():
            pattern = periodic_name(prefix)
            if pattern.fullmatch(path.name):
                same = [p for p in checkpoint_files(path.parent) if pattern.fullmatch(p.name) and p != path]
                for old in same[: max(len(same) - (n - 1), 0)]:
                    self.remove_checkpoint(old)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if not isinstance(path, str) or "://" not in path:
            checksum_path(Path(path)).unlink(missing_ok=True)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if isinstance(path, str | os.PathLike) and Path(path).is_file():
            problem = checksum_problem(Path(path))
            if problem is not None:
                raise checksum_error(Path(path), problem)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
            raise unreadable(Path(path), e) from e


def periodic_name(*prefixes: str) -> re.Pattern[str]:
    """The file names of periodic checkpoints with these prefixes: `step_00000010.ckpt`, `step_00000010-v1.ckpt`."""
    return re.compile("(" + "|".join(re.escape(p) for p in prefixes) + r")\d+(-v\d+)?\.ckpt")


class HashingWriter:
    """The file object torch.save writes to: passes the bytes on, hashing and counting them as they go, and keeping
    the OSError of a failed write (torch's zip writer replaces it with a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.written = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            n: int = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def write_failure(error: BaseException, writer: "HashingWriter | None") -> OSError | None:
    """The OSError behind a failed save (torch wraps it in a RuntimeError), or None for any other exception."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_WRITE_FAILURE):
        if writer is not None and writer.error is not None:
            return writer.error
        cause: BaseException | None = error
        while cause is not None:  # torch raises it while handling the OSError.
            if isinstance(cause, OSError):
                return cause
            cause = cause.__cause__ or cause.__context__
        return OSError(None, f"torch's checkpoint writer failed ({str(error)[:300]})")
    return None


def save_error(path: Path, checkpoint: Any, error: OSError, writer: "HashingWriter | None") -> CheckpointError:
    others = [p.name for p in checkpoint_files(path.parent) if p != path]
    kept = f" Earlier checkpoints are intact: {', '.join(others)}." if others else ""
    if error.errno == errno.EDQUOT:
        return CheckpointError(
            f"Could not write checkpoint {path}: your disk quota is exceeded.{kept} Free some space (old runs, or "
            "fewer keep_last_n_checkpoints), or set run_dir to a place with more quota."
        )
    try:
        estimate = tensor_bytes(checkpoint)
    except Exception:  # noqa: BLE001 - only an estimate, for the message.
        estimate = 0
    needed = max(writer.written if writer is not None else 0, estimate)
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = error.errno == errno.ENOSPC or (error.errno is None and free is not None and free < needed)
    if not full:
        return CheckpointError(f"Could not write checkpoint {path}: {error.strerror or error}.{kept}")
    space = f" The checkpoint needs about {human_bytes(needed)}"
    if free is not None:
        space += f" and {human_bytes(free)} are free on the disk of {path.parent}"
    return CheckpointError(
        f"Could not write checkpoint {path}: the disk is full.{kept}{space}: free some space there (old runs, "
        "or fewer keep_last_n_checkpoints), or set run_dir to another disk."
    )


def tensor_bytes(obj: Any, seen: set[tuple[str, int]] | None = None) -> int:
    """The bytes of the storages of the tensors in a checkpoint (nested dicts, lists and tuples), each storage once,
    as torch writes them: about the checkpoint's size on disk."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (str(obj.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return int(storage.nbytes())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def human_bytes(n: int | float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def sync_directory(directory: Path) -> None:
    """Makes the renames in a directory durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some filesystems cannot sync a directory; the rename is still atomic.
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------------
# Checksums.


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: Path, digest: str) -> None:
    """`<name>.sha256` beside the checkpoint, in `sha256sum`'s format, written atomically. A failure only warns:
    the checkpoint is intact, it just loads unchecked."""
    target = checksum_path(path)
    fd, tmp = temporary_file(target)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        print(f"Saved {path}, but could not write its checksum {target.name} ({e}).", file=sys.stderr, flush=True)


def temporary_file(path: Path) -> tuple[int, str]:
    """(fd, name) of a new `.<name>.<random>.tmp` beside `path`, to be renamed onto it, with the mode a plain `open`
    gives under the umask of the moment (`mkstemp`'s 0600 made the run's files unreadable to the user's group)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # (One in 2**48.)
            continue


def expected_digest(path: Path) -> str | None:
    """The sha256 recorded beside a checkpoint, or None when there is none (a checkpoint of an older mlfab)."""
    try:
        text = checksum_path(path).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable ({e})"
    m = re.match(r"([0-9a-f]{64})\b", text.strip())
    return m.group(1) if m else "unreadable (not a sha256 line)"


# What this process read from (or wrote into) each checkpoint file, by (what, path, inode, size, mtime): its
# "sha256", when its state was "saved_at"; so that choosing the checkpoint to resume from, pruning and loading read
# each file once.
_known: dict[tuple[str, str, int, int, int], Any] = {}


def _key(what: str, path: Path) -> tuple[str, str, int, int, int]:
    st = path.stat()
    return (what, str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def remember(what: str, path: Path, value: Any) -> None:
    if len(_known) > 10_000:
        _known.clear()
    _known[_key(what, path)] = value


def _recalled(what: str, path: Path, read: Callable[[], Any]) -> Any:
    key = _key(what, path)
    if key not in _known:
        remember(what, path, read())
    return _known[key]


def file_sha256(path: Path) -> str:
    def read() -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return str(_recalled("sha256", path, read))


def checksum_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint by its checksum file, or None when it matches or there is none. A checksum
    file that cannot be read is what is damaged (hand-edited, copied badly), not the checkpoint: that one is then
    checked as one without a checksum is, saying so."""
    expected = expected_digest(path)
    if expected is None:
        return None
    if expected.startswith("unreadable"):
        say_once(
            f"The checksum file {checksum_path(path)} is {expected}: {path.name} is checked only for being a complete "
            "torch checkpoint. (The next save of that name writes a new checksum.)"
        )
        return None
    actual = file_sha256(path)
    if actual == expected:
        return None
    return (
        f"its sha256 is {actual[:16]}..., not the {expected[:16]}... recorded in {checksum_path(path).name} when "
        "it was written: its bytes changed since"
    )


def damage(path: Path) -> str | None:
    """Why a checkpoint file is damaged (checksum mismatch; without a checksum, not a complete zip file, as a
    truncated one is not), or None when it looks intact. Reads the file once for its hash."""
    problem, expected = checksum_problem(path), expected_digest(path)
    if problem is not None or (expected is not None and not expected.startswith("unreadable")):
        return problem
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "it is a zip file but not a torch checkpoint"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"it is not a complete torch checkpoint ({e})"
    return None


def checksum_error(path: Path, problem: str) -> CheckpointError:
    intact = next((p for p in reversed(checkpoint_files(path.parent)) if p != path and damage(p) is None), None)
    hint = (
        f" The checkpoint {intact} is intact: resume from it (--ckpt_path {intact}), or move {path.name} out of the "
        "way so that a relaunch picks it."
        if intact
        else " Use another checkpoint, or start afresh."
    )
    return CheckpointError(f"Checkpoint {path} is corrupt or truncated: {problem}.{hint}")


def remove_stale_temporary_files(ckpt_dir: Path) -> list[Path]:
    """Removes the temporary files (`.<name>.*.tmp`) that processes killed while saving left in a checkpoint
    directory; says how many and how big. Only the process that writes the run's checkpoints calls it.

    One run owns its directory, but a file is only removed when it was last modified before this process
    started: a save in progress writes its file continuously, so another process still saving there (two launches
    into one directory, or a previous job still exiting) keeps its file."""
    if not ckpt_dir.is_dir():
        return []
    removed, size = [], 0
    for p in ckpt_dir.glob(".*.tmp"):
        try:
            st = p.stat()
            if not p.is_file() or st.st_mtime >= PROCESS_START:
                continue
            p.unlink()
        except OSError:
            continue
        removed.append(p)
        size += st.st_size
    for p in ckpt_dir.glob(f"*.ckpt{CHECKSUM_SUFFIX}"):  # A checksum whose checkpoint was removed by hand.
        if not p.with_name(p.name.removesuffix(CHECKSUM_SUFFIX)).exists():
            p.unlink(missing_ok=True)
    if removed:
        print(
            f"Removed {len(removed)} temporary file(s) ({human_bytes(size)}) that interrupted checkpoint saves left "
            f"in {ckpt_dir}.",
            file=sys.stderr,
            flush=True,
        )
    return removed


said: set[str] = set()  # Emptied at each launch (`run_cli`).


def say_once(message: str) -> None:
    """On stderr, once per launch: a relaunch looks for the checkpoint to go on from both when it parses its
    arguments and when the run starts."""
    if message not in said:
        said.add(message)
        print(message, file=sys.stderr, flush=True)


def intact_checkpoint(ckpt_dir: Path, announce: bool = True) -> Path | None:
    """The newest checkpoint in a directory that is not damaged (`damage`); when newer ones are, says which and
    why. None when there is no checkpoint; a CheckpointError when every one is damaged."""
    files = checkpoint_files(ckpt_dir)
    bad: list[tuple[Path, str]] = []
    for path in reversed(files):
        problem = damage(path)
        if problem is None:
            if bad and announce:
                which = ", ".join(f"{p} ({why})" for p, why in bad)
                say_once(
                    f"Checkpoint{'s' if len(bad) > 1 else ''} {which} {'are' if len(bad) > 1 else 'is'} corrupt or "
                    f"truncated: using {path}, the newest intact checkpoint, instead. (Left in place; the next save "
                    "of the same name replaces it.)"
                )
            return path
        bad.append((path, problem))
    if bad:
        listing = "\n".join(f"  - {p}: {why}" for p, why in bad)
        raise CheckpointError(
            f"No intact checkpoint in {ckpt_dir} to resume from; each is corrupt or truncated:\n{listing}\nMove "
            "them out of the way (or set exp_dir to a new directory) to start afresh."
        )
    return None


def check_ckpt_path(path: Any) -> Path:
    """An explicitly given checkpoint (`--ckpt_path`) exists, is a file and is not damaged: checked before the run
    starts (no run directory is created for a checkpoint that cannot be used)."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = checkpoint_files(p) or checkpoint_files(p / "checkpoints")
        listing = f" Checkpoints there: {', '.join(str(f) for f in found[-5:])}." if found else ""
        raise CheckpointError(f"--ckpt_path {path} is a directory, not a checkpoint file.{listing}")
    if not p.is_file():
        found = checkpoint_files(p.parent)
        listing = f" Checkpoints in {p.parent}: {', '.join(f.name for f in found[-5:])}." if found else ""
        raise CheckpointError(f"--ckpt_path {path}: no such checkpoint file.{listing}")
    problem = damage(p)
    if problem is not None:
        raise checksum_error(p, problem)
    return p


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in a directory, oldest first: by when their state was saved (`saved_at`), then name."""
    if not ckpt_dir.is_dir():
        return []
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (saved_at(p), p.name))


def saved_at(path: Path) -> float:
    """The time a checkpoint's state was saved, recorded in it by the Task (`checkpoint["mlfab"]["saved_at"]`), so
    that a run copied without its files' times (`cp -r`, an object store) resumes from its newest checkpoint and
    prunes its oldest; the modification time for a checkpoint without it (or one that does not load)."""

    def read() -> float:
        try:  # The pickled part only: tensors are mapped, not read. A file torch cannot load is judged elsewhere.
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("mlfab", {}).get("saved_at")
        except Exception:
            saved = None
        return saved if isinstance(saved, float) else path.stat().st_mtime

    return float(_recalled("saved_at", path, read))


def unreadable(path: Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint torch cannot load, saying what to do about it."""
    # torch tries its legacy (non-zip) format on anything that is not a zip file, and with weights_only its
    # unpickler then refuses the first bytes: garbage, not an object of the user's.
    complete = zipfile.is_zipfile(path)  # False also where it cannot be read.
    if complete and isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
        return CheckpointError(
            f"Checkpoint {path} holds an object that torch's safe loading (weights_only=True) refuses. The usual "
            "cause is a batch holding a type of your own (a tuple or list subclass, an object; dataclasses, "
            "namedtuples and mappings are stored as data), saved as the batch in flight: return tuples, dicts or "
            "tensors from collate. torch said: " + str(error)[:2000]
        )
    intact = next((p for p in reversed(checkpoint_files(path.parent)) if p != path and damage(p) is None), None)
    hint = (
        (f" The previous checkpoint {intact} looks intact: move {path.name} out of the way to resume from it.")
        if intact
        else " Delete it (or point exp_dir elsewhere) to start afresh."
    )
    what = str(error) if complete else "not a complete torch zip file"
    return CheckpointError(f"Checkpoint {path} is corrupt or truncated and cannot be loaded ({what}).{hint}")


def task_id(task_cls: type) -> str:
    return f"{task_cls.__module__}.{task_cls.__qualname__}"


def check_compatible(checkpoint: dict[str, Any], path: Path, task: pl.LightningModule) -> None:
    """The checkpoint must come from the same task class and hold weights of the same shapes."""
    saved_task = checkpoint.get("mlfab", {}).get("task")
    if saved_task is not None and saved_task.rsplit(".", 1)[-1] != type(task).__qualname__.rsplit(".", 1)[-1]:
        raise CheckpointError(
            f"Checkpoint {path} was written by task {saved_task}, not {task_id(type(task))}. "
            "Point exp_dir at a run directory of this task, or start a new run."
        )
    saved = checkpoint.get("state_dict", {})
    own = task.state_dict()
    problems = [f"missing weights {k}" for k in own if k not in saved]
    problems += [f"unexpected weights {k}" for k in saved if k not in own]
    problems += [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if problems:
        config_diff = _config_diff(checkpoint.get("hyper_parameters", {}).get("config", {}), task)
        listing = "\n".join(f"  - {p}" for p in problems[:10])
        raise CheckpointError(
            f"Checkpoint {path} does not fit this model (an incompatible config?):\n{listing}"
            + (f"\nConfig differences (checkpoint -> now): {config_diff}" if config_diff else "")
            + "\nResume with the config the run was started with, or start a new run."
        )


def _config_diff(saved: dict[str, Any], task: pl.LightningModule) -> str:
    now = task.hparams.get("config", {}) if hasattr(task, "hparams") else {}
    keys = sorted(set(saved) | set(now))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


def own_rng_state() -> dict[str, Any]:
    """This process's global random states (torch, CUDA, numpy, random), as a checkpoint stores them."""
    return plain_rng_state(collect_rng_states(include_cuda=torch.cuda.is_available()))


def gather_rng_states(trainer: Any, own: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The global random states of every rank, indexed by global rank: each one's `own` (taken earlier), or now."""
    own = own if own is not None else own_rng_state()
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [own]
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, own)
    return everyone


def restore_rng_states(trainer: Any, states: list[dict[str, Any]] | None) -> None:
    if states and trainer.global_rank < len(states):
        set_rng_states(plain_rng_state(states[trainer.global_rank], inverse=True))


def plain_rng_state(state: Any, inverse: bool = False) -> Any:
    """numpy's legacy RNG state holds an ndarray, which `torch.load(weights_only=True)` refuses: store a tensor
    (`inverse`: the numpy state back)."""
    if isinstance(state, dict):
        return {k: plain_rng_state(v, inverse) for k, v in state.items()}
    if isinstance(state, tuple | list) and state and state[0] == "MT19937":
        array = np.asarray(state[1], dtype=np.uint32 if inverse else np.int64)
        return ("MT19937", array if inverse else torch.from_numpy(array), *state[2:])
    return state


def around_saves(
    checkpoint_io: Any, before: Callable[[Path], None], after: Callable[[Path], None], synchronous: str | None = None
) -> None:
    """Makes a Trainer's checkpoint IO call `before(path)` and `after(path)` around every checkpoint it writes (the
    task's `on_before_save_ckpt` / `on_after_save_ckpt`), whichever IO plugin it is; installing it again replaces
    the previous pair. mlfab's background writer (`async_checkpoints`) takes them itself, and writes every checkpoint
    before the save call returns when given a reason to (`synchronous`: the task's own save hooks, which expect the
    file on disk, or a logger that uploads each checkpoint as soon as it is saved)."""
    set_save_hooks = getattr(checkpoint_io, "set_save_hooks", None)
    if set_save_hooks is not None:
        set_save_hooks(before, after, synchronous)
        return
    save = getattr(checkpoint_io, "_save_without_hooks", checkpoint_io.save_checkpoint)

    def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        before(Path(path))
        save(checkpoint, path, storage_options)
        after(Path(path))

    checkpoint_io._save_without_hooks = save
    checkpoint_io.save_checkpoint = save_checkpoint
