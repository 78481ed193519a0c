"""Periodic checkpoints written in a background thread (config `async_checkpoints`), so that training waits only for
a copy of the checkpoint in host memory, not for its write.

`BackgroundCheckpointIO` wraps the `AtomicCheckpointIO` that does the writing (temporary file, fsync, rename, the
sha256 file, keep_last pruning), so a process killed during a background write leaves what a synchronous save
killed at the same point leaves: the previous checkpoints intact. How it behaves:

- Only the saves `background(path)` picks (mlfab's periodic checkpoints, `step_*` / `time_step_*`) are written in
  the background; every other save (`last.ckpt` at the end, SIGUSR1's `signal_step_*`, a user's own
  ModelCheckpoint) is written at once, after the background write in flight, so that it is on disk when the
  Trainer call returns, before a Slurm requeue, and newer (by mtime) than every periodic checkpoint before it.
- A save first waits for the previous background write: one write at a time, one copy in memory.
- The writer thread runs at the lowest CPU priority (`lowest_priority`): hashing and writing a checkpoint take about
  as much CPU time as a synchronous save took, and a training loop that keeps every core busy (on a CPU) would be
  slowed by it as much; at the lowest priority it uses the CPU time training leaves (a GPU's training loop leaves
  most of it). A write still in flight at the next save is then waited for, as a synchronous save would have been.
- The copy: each tensor storage of the checkpoint is copied once to host memory (views and tied weights keep
  sharing it, as torch.save stores them), into buffers kept from the previous save when the sizes match (a fresh
  allocation costs the page faults of the whole checkpoint again); containers are rebuilt and other mutable values
  deep-copied, so nothing training does afterwards changes what is written. Copies the checkpoint was collected
  with (schedule-free's evaluation and training weights, `optim.save_in_eval_mode`) are made into those buffers in
  the first place (`staged_copies`) and written as they are, not copied twice; one a callback kept past its save
  keeps its buffer (a later save takes new memory rather than overwrite it). Tensors of a GPU are written as CPU
  tensors (Lightning loads every checkpoint onto the CPU anyway; `torch.load` without `map_location` gives CPU
  tensors instead of CUDA ones). When the copy would not fit in the memory the system has available, that save
  is written synchronously, saying so.
- A failed background write is printed when it happens and raised (the CheckpointError mlfab gives for a failed
  save, or the original exception) by the next save, once that save is written (at once: the state since is kept),
  or when the Trainer tears down (the end of `fit`, also after an exception: then it is printed and the first
  exception goes on). Files removed in the meantime (ModelCheckpoint's
  `save_top_k`) are removed after the write, in order, and not at all when it failed.
- A task overriding mlfab 0.2's `on_before_save_ckpt` / `on_after_save_ckpt` gets synchronous saves, its hooks
  around each write as before (`on_after_save_ckpt` promises the file is on disk), saying so once.

Lightning's own `AsyncCheckpointIO` (2.6) clones tensors on their device (a GPU's memory doubled), loses storage
sharing (tied weights written twice), queues any number of copies, leaves other mutable values shared, raises a
background error only when it happened to finish before the next save, and would run mlfab's `on_after_save_ckpt`
before the write; torch's `torch.distributed.checkpoint.async_save` writes a directory of shards, not a file with a
checksum: so mlfab has this small writer of its own.
"""

import contextlib
import copy
import enum
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from torch import nn
from typing_extensions import override

from mlfab.checkpoints import AtomicCheckpointIO, human_bytes, tensor_bytes

# Values torch.save writes as they are: nothing training does later changes them.
IMMUTABLE = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
    enum.Enum,
    PurePath,
)


class BackgroundCheckpointIO(CheckpointIO):
    """Writes the checkpoints `background(path)` picks in a background thread through `checkpoint_io`, the others
    at once (see the module's docstring)."""

    def __init__(self, checkpoint_io: AtomicCheckpointIO, background: Callable[[Path], bool]) -> None:
        super().__init__()
        self.checkpoint_io = checkpoint_io
        self.background = background
        self._hooks: tuple[Callable[[Path], None], Callable[[Path], None]] | None = None
        self._sync_reason: str | None = None  # Why every save is synchronous, when it is (`set_save_hooks`).
        self._told: set[str] = set()
        self._start()

    def _start(self) -> None:
        """The writer's state of this process (not pickled: `ddp_spawn` sends the Trainer to each process)."""
        self._jobs: deque[tuple[str, Path, Callable[[], None]]] = deque()  # (written/removed, file, job)
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging = Staging()

    def __getstate__(self) -> dict[str, Any]:
        self.wait()
        skip = ("_jobs", "_done", "_thread", "_error", "_staging")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    def set_save_hooks(
        self, before: Callable[[Path], None], after: Callable[[Path], None], synchronous: str | None
    ) -> None:
        """mlfab 0.2's `on_before_save_ckpt` / `on_after_save_ckpt` (`around_saves`), called around every write;
        given a reason (`synchronous`, said once), every save is written before its call returns."""
        self._hooks = (before, after)
        self._sync_reason = synchronous

    def staged_copies(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a save about to be collected: a function that copies a tensor into this save's host buffers, so that
        copies a checkpoint is collected with (`optim.save_in_eval_mode`'s) need not be copied again to be written in
        the background, and reuse the memory of the previous save instead of faulting in new pages. None where
        saves are synchronous."""
        if self._sync_reason is not None:
            return None
        self._wait_for_jobs()  # The buffers of the previous save are free once it was written.
        self._staging.begin()
        return self._staging.copy

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        self._wait_for_jobs()  # One write at a time.
        failed, self._error = self._error, None
        try:  # After a failed write, this one at once, before that error stops the run: the state since is kept.
            self._save(checkpoint, path, storage_options, at_once=failed is not None)
        except BaseException as e:
            if failed is None:
                raise
            failed.add_note(f"The next save, {path}, failed too: {e}")
            raise failed from e
        finally:
            self._staging.finish()
        if failed is not None:
            failed.add_note(f"The state at the next save was written to {path} first: relaunch to go on from it.")
            raise failed

    def _save(self, checkpoint: dict[str, Any], path: Path, storage_options: Any, at_once: bool) -> None:
        if self.background(path) and self._sync_reason is None and not at_once:
            needed = tensor_bytes(checkpoint) - self._staging.reusable_bytes()
            available = available_memory()
            if available is None or needed < 0.8 * available:
                snapshot = self._staging.snapshot(checkpoint)
                self._submit(path, lambda: self.checkpoint_io.save_checkpoint(snapshot, path, storage_options))
                return
            self._tell(
                "memory",
                f"Checkpoint {path.name} is written synchronously (async_checkpoints; so is any later one whose copy "
                f"does not fit in memory): its copy would take {human_bytes(needed)} more memory, and the system has "
                f"{human_bytes(available)} available.",
            )
        elif self.background(path) and not at_once:
            self._tell("hooks", f"Checkpoints are written synchronously (async_checkpoints): {self._sync_reason}.")
        before, after = self._hooks or (None, None)
        if before is not None:
            before(path)
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
        if after is not None:
            after(path)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """At once, or after the background write in flight (never when it fails: ModelCheckpoint removes an older
        file once it asked for the newer one to be saved)."""
        with self._done:
            if self._jobs:
                self._jobs.append(("removed", Path(path), lambda: self.checkpoint_io.remove_checkpoint(path)))
                return
        self._raise_error()
        self.checkpoint_io.remove_checkpoint(path)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        self.wait()
        return self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def teardown(self) -> None:
        """The end of a Trainer call (also after an exception): the background write is finished and its error raised;
        while another exception is on its way out, printed instead."""
        self._staging.release()
        if sys.exc_info()[1] is None:
            self.wait()
            return
        self._wait_for_jobs()
        error, self._error = self._error, None
        if error is not None:
            print(f"Also, a checkpoint written in the background failed: {error}", file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Returns once no write is in flight; raises the error of a failed one (once)."""
        self._wait_for_jobs()
        self._raise_error()

    def _wait_for_jobs(self) -> None:
        with self._done:
            while self._jobs:
                self._done.wait()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _submit(self, path: Path, job: Callable[[], None]) -> None:
        with self._done:
            self._jobs.append(("written", path, job))
            if self._thread is None:  # Else the running writer takes it (it leaves only with no job left).
                # Not a daemon: an interpreter that exits waits for the write (a Trainer's teardown already did).
                self._thread = threading.Thread(target=self._work, name="mlfab-checkpoint-writer", daemon=False)
                self._thread.start()

    def _work(self) -> None:
        lowest_priority()
        while True:
            with self._done:
                if not self._jobs:
                    self._thread = None
                    self._done.notify_all()
                    return
                what, path, job = self._jobs[0]
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - kept for the training thread, which raises it.
                e.add_note(
                    f"(Checkpoint {path} was being {what} in the background, async_checkpoints=true: the error "
                    "surfaced at the next save or at the end of the run.)"
                )
                print(
                    f"Checkpoint {path} could not be {what} in the background: {e} Training stops at the next save "
                    "(written first) or when it ends.",
                    file=sys.stderr,
                    flush=True,
                )
                with self._done:
                    self._error = e
                    self._jobs.clear()  # Nothing after a failed write: not the removal of an older checkpoint.
                continue  # The writer leaves: no job is left.
            with self._done:
                self._jobs.popleft()
                self._done.notify_all()

    def _tell(self, what: str, message: str) -> None:
        if what not in self._told:
            self._told.add(what)
            print(message, file=sys.stderr, flush=True)


class Staging:
    """Copies a checkpoint to host memory (`snapshot`), reusing the buffers of the previous copy. A save's copies
    begin (`begin`) once no write reads the buffers of the previous one, and end with `finish`."""

    def __init__(self) -> None:
        self._used: list[torch.UntypedStorage] = []  # Those of the last save: free once it was written.
        self._free: dict[int, list[torch.UntypedStorage]] | None = None  # During a save: {size: unused buffers}.
        # The buffers `copy` filled (by data pointer; during a save, not copied again), and the tensor it returned.
        self._handed: dict[int, weakref.ref[torch.Tensor]] = {}

    def _reusable(self) -> list[torch.UntypedStorage]:
        """The last save's buffers the next one may overwrite: a tensor `copy` returned for it that is still alive (a
        callback kept the checkpoint's weights) keeps its buffer, and the next save takes new memory instead."""
        kept = {ptr for ptr, ref in self._handed.items() if ref() is not None}
        return [b for b in self._used if b.data_ptr() not in kept]

    def begin(self) -> None:
        self._free = {}
        for b in self._reusable():
            self._free.setdefault(b.nbytes(), []).append(b)
        self._used, self._handed = [], {}

    def finish(self) -> None:
        self._free = None

    def reusable_bytes(self) -> int:
        """The bytes of the buffers the copy of the save to come needs not allocate."""
        if self._free is None:
            return sum(b.nbytes() for b in self._reusable())
        return sum(b.nbytes() for bs in self._free.values() for b in bs) + sum(
            b.nbytes() for b in self._used if b.data_ptr() in self._handed
        )

    def release(self) -> None:
        self._used, self._handed, self._free = [], {}, None

    def _buffer(self, nbytes: int) -> torch.UntypedStorage:
        if self._free is None:
            self.begin()
        assert self._free is not None
        free = self._free.get(nbytes)
        buffer = free.pop() if free else torch.UntypedStorage(nbytes, device="cpu")
        self._used.append(buffer)
        return buffer

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """`t.detach().clone()`, into one of this save's buffers where `t` fills its storage (a parameter's)."""
        t = t.detach()
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.is_conj() or t.is_neg():
            return t.clone()  # (Sparse tensors have no untyped storage.)
        storage = t.untyped_storage()
        if t.storage_offset() != 0 or not t.is_contiguous() or t.nbytes != storage.nbytes():
            return t.clone()
        buffer = self._buffer(storage.nbytes())
        as_bytes(buffer).copy_(as_bytes(storage))
        out = torch.empty(0, dtype=t.dtype).set_(buffer, 0, t.size(), t.stride())
        self._handed[buffer.data_ptr()] = weakref.ref(out)
        return out

    def snapshot(self, checkpoint: Any) -> Any:
        copies: dict[tuple[str, int, int], torch.UntypedStorage] = {}

        def storage_copy(storage: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
            if device.type == "cpu" and self._free is not None and storage.data_ptr() in self._handed:
                return storage  # Copied for this save already (`copy`; outside a save, `_handed` is the last one's).
            key = (str(device), storage.data_ptr(), storage.nbytes())
            if key not in copies:
                buffer = self._buffer(storage.nbytes())
                as_bytes(buffer).copy_(as_bytes(storage))  # A tensor's copy uses torch's threads; a storage's fewer.
                copies[key] = buffer
            return copies[key]

        def tensor(t: torch.Tensor) -> Any:
            if t.device.type == "meta":
                return t
            plain = type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided
            if not plain or t.is_quantized or t.is_conj() or t.is_neg():
                return t.detach().to("cpu", copy=True)
            out = torch.empty(0, dtype=t.dtype).set_(
                storage_copy(t.untyped_storage(), t.device), t.storage_offset(), t.size(), t.stride()
            )
            if isinstance(t, nn.Parameter):
                return nn.Parameter(out, requires_grad=t.requires_grad)
            return out.requires_grad_(True) if t.requires_grad else out

        memo: dict[int, Any] = {}  # By id: an object twice in the checkpoint is one object twice in the copy.

        def walk(obj: Any) -> Any:
            if isinstance(obj, IMMUTABLE):
                return obj
            if id(obj) not in memo:
                memo[id(obj)] = copied(obj)
            return memo[id(obj)]

        def copied(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor(obj)
            if type(obj) is tuple:
                return tuple(walk(v) for v in obj)
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # A namedtuple.
                return type(obj)(*(walk(v) for v in obj))
            if isinstance(obj, dict | list):  # Also OrderedDict, Lightning's AttributeDict, defaultdict, ...
                out = copy.copy(obj)
                for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
                    out[k] = walk(v)
                return out
            if isinstance(obj, np.ndarray):
                return obj.copy()
            return copy.deepcopy(obj)

        return walk(checkpoint)


def as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def lowest_priority() -> None:
    """Gives the calling thread the lowest CPU priority (nice 19; Linux sets it per thread), so that a background
    write uses the CPU time training leaves rather than slowing its steps (most with a training loop that keeps every
    core busy, as on a CPU; it leaves a GPU's training loop most of its core anyway). Elsewhere, or where the system
    refuses, the thread keeps the process's priority: the write is only slower to hide."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def available_memory() -> int | None:
    """The memory the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
