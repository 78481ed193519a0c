"""Checkpoint files: atomic writes, clear errors for unreadable ones, and checking one fits the task.

Lightning's own atomic save writes its temporary file in the system temp directory and moves it, which
is a copy (not an atomic rename) when that directory is on another filesystem. mlfab writes the temporary
file next to the checkpoint, fsyncs it and renames it, so a process killed mid-save never leaves a broken
newest checkpoint, and a failed save (disk full) leaves the previous ones untouched.
"""

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from mlfab._lightning import collect_rng_states, set_rng_states
from mlfab.errors import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                others = [p.name for p in checkpoint_files(path.parent) if p != path]
                kept = f" Earlier checkpoints are intact: {', '.join(others)}." if others else ""
                why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise CheckpointError(f"Could not write checkpoint {path}: {why}.{kept}") from e
            raise

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as e:
            raise unreadable(Path(path), e) from e


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in a directory, oldest first (by modification time, then name)."""
    if not ckpt_dir.is_dir():
        return []
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def unreadable(path: Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint torch cannot load, saying what to do about it."""
    if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
        return CheckpointError(
            f"Checkpoint {path} holds an object that torch's safe loading (weights_only=True) refuses. The usual "
            "cause is a batch of a type of your own (e.g. a namedtuple from a dataset's collate), saved as the "
            "batch in flight: return tuples, dicts or tensors from collate. torch said: " + str(error)[:2000]
        )
    others = [p for p in checkpoint_files(path.parent) if p != path]
    hint = (
        (f" The previous checkpoint {others[-1]} looks intact: move {path.name} out of the way to resume from it.")
        if others
        else " Delete it (or point exp_dir elsewhere) to start afresh."
    )
    return CheckpointError(f"Checkpoint {path} is corrupt or truncated and cannot be loaded ({error}).{hint}")


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


def gather_rng_states(trainer: Any) -> list[dict[str, Any]]:
    """The global random states of every rank (torch, CUDA, numpy, random), indexed by global rank."""
    own = plain_rng_state(collect_rng_states(include_cuda=torch.cuda.is_available()))
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [own]
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, own)
    return everyone


def restore_rng_states(trainer: Any, states: list[dict[str, Any]] | None) -> None:
    if states and trainer.global_rank < len(states):
        set_rng_states(numpy_rng_state(states[trainer.global_rank]))


def plain_rng_state(state: Any) -> Any:
    """numpy's legacy RNG state holds an ndarray, which `torch.load(weights_only=True)` refuses: store a tensor."""
    if isinstance(state, dict):
        return {k: plain_rng_state(v) for k, v in state.items()}
    if isinstance(state, tuple) and state and state[0] == "MT19937":
        return ("MT19937", torch.from_numpy(np.asarray(state[1], dtype=np.int64)), *state[2:])
    return state


def numpy_rng_state(state: Any) -> Any:
    """The inverse of `plain_rng_state`."""
    if isinstance(state, dict):
        return {k: numpy_rng_state(v) for k, v in state.items()}
    if isinstance(state, tuple | list) and state and state[0] == "MT19937":
        return ("MT19937", np.asarray(state[1], dtype=np.uint32), *state[2:])
    return state
