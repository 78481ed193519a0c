"""Dataloaders for whatever `get_dataset` returns: a dpshdl Dataset, a torch map-style or iterable dataset.

dpshdl datasets are endless iterators yielding numpy arrays; they are wrapped as a torch IterableDataset
whose workers each get `worker_init(global_worker_id, global_num_workers)` over ranks x dataloader workers.
Batches reach the task as torch tensors with their dtypes kept (uint8 images stay uint8).
"""

import collections
import copy
import dataclasses
import logging
import os
import random
import signal
import threading
import time
import traceback
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from dpshdl.dataset import Dataset as DpshdlDataset
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, default_collate, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from typing_extensions import override

from mlfab._lightning import collect_rng_states, set_rng_states, unrepeated_sampler
from mlfab.checkpoints import plain_rng_state
from mlfab.errors import ConfigError, DatasetError
from mlfab.loader import MlfabLoader

log = logging.getLogger(__name__)


_TORCH_KINDS = "biufc"  # numpy dtype kinds torch has a dtype for: bool, ints, unsigned ints, floats, complex.


def to_torch(value: Any) -> Any:
    """numpy arrays (anywhere in tuples, lists, mappings, namedtuples and dataclasses) -> torch tensors.

    Each container keeps its type (see `_rebuilt`). Arrays of a kind torch has no dtype for (strings, bytes, dates,
    objects) stay numpy arrays."""
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in _TORCH_KINDS:
            return value
        array = np.asarray(value, dtype=value.dtype.newbyteorder("="))  # A scalar as a 0-d array; native byte order.
        # (np.ascontiguousarray would make a 0-d array 1-d.)
        return torch.from_numpy(array if array.flags.c_contiguous else np.ascontiguousarray(array))
    return _rebuilt(value, to_torch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Lightning's `move_data_to_device` (tensors, and anything with a `to` method), also for a frozen dataclass
    anywhere in the batch, which Lightning refuses ("A frozen dataclass was passed to `apply_to_collection`")."""
    if callable(getattr(batch, "to", None)):
        return move_data_to_device(batch, device)
    return _rebuilt(batch, lambda item: to_device(item, device))


def _rebuilt(value: Any, convert: Callable[[Any], Any]) -> Any:
    """`value` with `convert` applied to each item where it is a container, of the same type: a dataclass (its fields
    that `__init__` takes; `dataclasses.replace`, so a frozen one too), a mapping, a namedtuple, a list or a tuple.
    Anything else is returned as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _replaced(value, {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    if isinstance(value, Mapping):
        return _with_items(value, {k: convert(v) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(convert(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(convert(v) for v in value)
    return value


def _replaced(value: Any, changes: dict[str, Any]) -> Any:
    """A copy of a dataclass instance with `changes`. `dataclasses.replace` builds it as its class does (frozen ones
    too); where its `__init__` or `__post_init__` refuses that (an InitVar without a default, a check of the numpy
    type), the fields of a shallow copy are set directly, as Lightning does when it moves a batch to the device."""
    try:
        return dataclasses.replace(value, **changes)
    except Exception:
        out = copy.copy(value)
        for name, item in changes.items():
            object.__setattr__(out, name, item)
        return out


def _with_items(value: Mapping, items: dict[Any, Any]) -> Mapping:
    """A copy of a mapping holding `items`, of the same type where a shallow copy takes them: a defaultdict keeps its
    default factory (its constructor does not take a dict), an OrderedDict, Counter or dict subclass its type. A
    mapping that cannot be copied or changed (MappingProxyType, a read-only Mapping) becomes a plain dict."""
    try:
        out = copy.copy(value)
        for key, item in items.items():
            out[key] = item  # type: ignore[index]
    except Exception:
        return items
    return out


_RANK_ENV, _WORLD_ENV = "MLFAB_GLOBAL_RANK", "MLFAB_WORLD_SIZE"


def worker_shard() -> tuple[int, int]:
    """(index, count) of this data shard: one shard per (rank, dataloader worker) pair over all ranks.

    Call it inside a torch IterableDataset's `__iter__` to read only your share of the data, e.g.
    `index, count = mlfab.worker_shard(); yield from items[index::count]`. mlfab's dataloaders set the rank
    for their workers (inherited through the environment, so it works with fork and spawn alike).
    """
    info = get_worker_info()
    worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    rank, world = int(os.environ.get(_RANK_ENV, 0)), int(os.environ.get(_WORLD_ENV, 1))
    return rank * num_workers + worker_id, world * num_workers


def worker_init(worker_id: int) -> None:
    """The `worker_init_fn` of every mlfab dataloader: the worker leaves the signals that a terminal (Ctrl-C), Slurm
    and Kubernetes send to a whole process group (SIGINT, SIGTERM, SIGUSR1) to the main process.

    The main process stops at the end of the current step, saves a checkpoint and then stops its workers itself;
    a worker that died of the signal first would make it fail instead ("DataLoader worker ... is killed by signal")
    before it saved. So a worker ignores SIGINT and SIGUSR1, and ignores SIGTERM except from its parent: the main
    process ends a worker that does not exit when asked with SIGTERM (torch's shutdown, and multiprocessing's at
    exit), which must still work, or a run whose worker hangs in the dataset would hang at exit. SIGKILL still kills
    a worker, and the main process reports it as before. (Programs a worker starts inherit the ignored signals.)
    """
    if threading.current_thread() is not threading.main_thread():
        return  # Only the main thread may set signal handlers (a worker runs in its own process's main thread).
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    # SIGTERM is blocked (in this thread and those started after it) and taken by a thread that can see who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from_parent_only, name="mlfab-sigterm", daemon=True).start()


def _sigterm_from_parent_only() -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():  # What torch's own worker handler does for its parent's SIGTERM.
            os._exit(0)


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "unknown"


def _worker_prefix() -> str:
    info = get_worker_info()
    return f"[dataloader worker {info.id}] " if info is not None else ""


class RepeatedWarning:
    """A warning that may repeat thousands of times a second (a sample that fails to load, a batch that fails to
    collate): the first `first_n` are logged in full, then at most one line every `every_s` seconds, saying how many
    there were since the last line and in all (in this process: each dataloader worker counts its own)."""

    def __init__(self, what: str, first_n: int = 3, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.first_n = first_n
        self.every_s = every_s
        self.clock = clock
        self.total = 0
        self._since = 0
        self._last = clock()

    def __call__(self, message: str, summary: Callable[[], str] | None = None) -> None:
        """`message` describes this occurrence; `summary` (called only when a count is logged) all of them."""
        self.total += 1
        now = self.clock()
        if self.total <= self.first_n:
            later = (
                f" (from now on one line every {self.every_s:.0f} s counts them)" if self.total == self.first_n else ""
            )
            log.warning("%s%s%s", _worker_prefix(), message, later)
            self._last = now
            return
        self._since += 1
        if now - self._last >= self.every_s:
            log.warning(
                "%s%d more %s in the last %.0f s (%d in all); %s",
                _worker_prefix(),
                self._since,
                self.what,
                now - self._last,
                self.total,
                summary() if summary is not None else f"the last: {message}",
            )
            self._last, self._since = now, 0


class BadSamples:
    """Counts samples whose loading raised, by exception type and place; stops at `max_in_a_row` in a row."""

    def __init__(self, name: str, max_in_a_row: int | None) -> None:
        self.name = name
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.warning = RepeatedWarning(f"samples from {name} failed to load")

    def ok(self) -> None:
        self.in_a_row = 0

    def failed(self, exc: Exception) -> None:
        where = _where(exc)
        self.counts[f"{type(exc).__name__} at {where}"] += 1
        self.total += 1
        self.in_a_row += 1
        if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row:  # As the help says: this many.
            raise DatasetError(
                f"{self.in_a_row} samples in a row from {self.name} failed to load (max_bad_samples_in_a_row="
                f"{self.max_in_a_row}); most frequent:\n{self.summary()}\nLast error: {type(exc).__name__}: {exc}"
            ) from exc
        self.warning(
            f"Skipping a sample from {self.name} that failed to load: {type(exc).__name__}: {exc} (at {where})",
            lambda: "most frequent: " + "; ".join(f"{n} x {what}" for what, n in self.counts.most_common(3)),
        )

    def summary(self) -> str:
        return "\n".join(f"  {n:6d} x {what}" for what, n in self.counts.most_common(5))


def _rng_attributes(obj: Any, depth: int = 2) -> dict[str, Any]:
    """Random generators held by a dataset (and datasets it wraps), found by attribute."""
    found: dict[str, Any] = {}
    for name, value in getattr(obj, "__dict__", {}).items():  # (A plain list as a dataset has no attributes.)
        if isinstance(value, np.random.Generator | np.random.RandomState | random.Random | torch.Generator):
            found[name] = value
        elif depth > 0 and isinstance(value, DpshdlDataset):
            found.update({f"{name}.{k}": v for k, v in _rng_attributes(value, depth - 1).items()})
    return found


def _get_rng(gen: Any) -> Any:
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    if isinstance(gen, np.random.RandomState | torch.Generator):
        return plain_rng_state(gen.get_state())
    return gen.getstate()


def dataset_state(dataset: Any) -> Any:
    """What resumes a dataset exactly: its own `state_dict()`, or the states of the generators it holds."""
    own = getattr(dataset, "state_dict", None)
    return own() if callable(own) else {k: _get_rng(g) for k, g in _rng_attributes(dataset).items()}


def load_dataset_state(dataset: Any, state: Any) -> None:
    own = getattr(dataset, "load_state_dict", None)
    if callable(own):
        if state is not None:
            own(state)
        return
    gens = _rng_attributes(dataset)
    for name, value in (state or {}).items():
        if name in gens:
            _set_rng(gens[name], value)


def worker_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the global random states of the dataloader worker it is taken in (the main process's are saved
    with the task)."""
    if get_worker_info() is not None:
        state["global_rng"] = plain_rng_state(collect_rng_states(include_cuda=False))
    return state


def load_worker_rng_state(state: dict[str, Any]) -> None:
    if "global_rng" in state and get_worker_info() is not None:  # In the worker, after torch seeded it.
        set_rng_states(plain_rng_state(state["global_rng"], inverse=True))


def _set_rng(gen: Any, state: Any) -> None:
    if isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    elif isinstance(gen, np.random.RandomState):
        gen.set_state(plain_rng_state(tuple(state), inverse=True))
    elif isinstance(gen, torch.Generator):
        gen.set_state(state)
    else:
        gen.setstate(state)


class DpshdlIterable(IterableDataset):
    """Runs a dpshdl dataset inside torch's DataLoader; each (rank, worker) is one dpshdl worker.

    Its state (for exact resume) is the dataset's own `state_dict()` when it has one, otherwise every
    random generator it holds, plus (in a worker process) the worker's global random states. A sample
    whose loading raises is skipped and counted.
    """

    def __init__(self, dataset: DpshdlDataset, max_bad_in_a_row: int | None = 100) -> None:
        self.dataset = dataset
        self.bad = BadSamples(type(dataset).__name__, max_bad_in_a_row)
        self._pending_state: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        self.dataset.worker_init(*worker_shard())
        if self._pending_state is not None:
            self._apply(self._pending_state)
            self._pending_state = None
        return self._samples()

    def _samples(self) -> Iterator[Any]:
        while True:
            try:
                item = self.dataset.next()
            except StopIteration:
                return
            except Exception as e:
                self.bad.failed(e)
                continue
            self.bad.ok()
            yield item

    def state_dict(self) -> dict[str, Any]:
        bad = {"bad_total": self.bad.total, "bad_counts": dict(self.bad.counts)}
        return worker_rng_state({**bad, "dataset": dataset_state(self.dataset)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = state  # Applied after `worker_init`, which may reset the dataset's generators.

    def _apply(self, state: dict[str, Any]) -> None:
        self.bad.total = state.get("bad_total", 0)
        self.bad.counts.update(state.get("bad_counts", {}))
        load_dataset_state(self.dataset, state.get("dataset"))
        load_worker_rng_state(state)


class Forwarding:
    """What a wrapper of the user's dataset (`self.dataset`) passes on to it: attributes read and written, other than
    the wrapper's `own`, and `len()` (a length Lightning counts batches by)."""

    own: tuple[str, ...] = ("dataset",)
    dataset: Any

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # Not set yet (unpickling in a worker): no recursion.
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)

    def __len__(self) -> int:
        return len(self.dataset)  # A TypeError for a set without a length, as `len` of the set itself.


class IterableStateful(Forwarding, IterableDataset):
    """A torch IterableDataset without a `state_dict` of its own, as the training loader sees it, so that a resume
    goes on where the stream was, with the random numbers it drew: its state is the random states at the start of
    the pass in progress (the generators it holds, the process's global ones) and the samples drawn since. A resume
    sets those states and draws that many samples again, dropping them (the pass must yield the same samples in
    the same order from the same random states; a `state_dict` / `load_state_dict` of the dataset's own avoids the
    replay). Each (rank, worker) keeps its own."""

    replays = True  # (What MlfabLoader tells on a resume.)
    own = ("dataset", "_start", "_drawn", "_pending")

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset
        self._start: dict[str, Any] = {}
        self._drawn = 0
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        if pending is not None:
            load_dataset_state(self.dataset, pending["start"]["dataset"])
            set_rng_states(plain_rng_state(pending["start"]["global_rng"], inverse=True))
        self._start = {
            "dataset": dataset_state(self.dataset),
            "global_rng": plain_rng_state(collect_rng_states(include_cuda=False)),
        }
        samples, self._drawn = iter(self.dataset), 0
        for _ in range(pending["drawn"] if pending is not None else 0):
            if next(samples, _END) is _END:
                break
            self._drawn += 1
        return self._samples(samples)

    def _samples(self, samples: Iterator[Any]) -> Iterator[Any]:
        for sample in samples:
            self._drawn += 1
            yield sample

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start, "drawn": self._drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state  # Applied when the resumed pass starts (in its worker).


_END = object()


class MapStateful(Forwarding, TorchDataset):
    """A map-style training dataset as the dataloader sees it, so that exact resume restores what augmentation draws
    from, as `DpshdlIterable` does for streams: the generators the dataset holds (or its own `state_dict`), and each
    dataloader worker's global random states (torch, numpy, random). torchdata's StatefulDataLoader saves and
    restores a map-style dataset's `state_dict` in every worker (and in the main process without workers). Any other
    attribute is the dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def state_dict(self) -> dict[str, Any]:
        return worker_rng_state({"dataset": dataset_state(self.dataset)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_dataset_state(self.dataset, state.get("dataset"))
        load_worker_rng_state(state)


class Collate:
    """Uses the dataset's own `collate` when it has one, then turns numpy arrays into tensors.

    A batch that fails to collate (its collate raised, or returned None: a missing `return`, or a batch it dropped)
    becomes None, which the training loader skips and counts and the validation and test steps skip.
    `max_bad_in_a_row` such batches in a row (in one process: each dataloader worker counts its own) stop the run
    with a DatasetError; the key is `max_bad_samples_in_a_row`, which counts batches here. The warnings are
    rate-limited (RepeatedWarning). A batch mlfab cannot turn into tensors stops the run at once: it is no fault of
    the collate, and every batch would fail the same way; nor are samples torch's default_collate has no rule for."""

    def __init__(
        self, collate: Callable[[list[Any]], Any] | None, max_bad_in_a_row: int | None = 100, name: str = "the dataset"
    ) -> None:
        self.collate = collate
        self.max_bad_in_a_row = max_bad_in_a_row
        self.name = name
        self.in_a_row = 0
        self.warning = RepeatedWarning("batches failed to collate")

    def __call__(self, items: list[Any]) -> Any:
        try:
            batch = default_collate(items) if self.collate is None else self.collate(items)
        except TypeError as e:
            if self.collate is None and str(e).startswith("default_collate: batch must contain"):
                raise DatasetError(  # The samples' type, not a bad sample: every batch would fail the same way.
                    f"{self.name} has no `collate` method, and torch's default_collate cannot batch its samples: {e}. "
                    "Give the dataset a `collate(self, items)` method that builds the batch (dataclass samples and "
                    "string arrays need one), or return tensors, numbers, numeric numpy arrays or strings in tuples, "
                    "lists or dicts."
                ) from e
            self.failed(e)
            return None
        except Exception as e:
            self.failed(e)
            return None
        if batch is None:
            where = _source(self.collate)
            self.failed(
                DatasetError(
                    f"{self.name}.collate returned None for a batch of {len(items)} samples: check that it returns "
                    "the batch (is its `return` missing?). A batch it skips on purpose (by raising, or returning "
                    "None) counts against max_bad_samples_in_a_row"
                ),
                where,
            )
            return None
        self.in_a_row = 0
        if self.collate is None:
            return batch  # default_collate's tensors.
        try:
            return to_torch(batch)
        except Exception as e:
            raise DatasetError(
                f"mlfab could not turn the numpy arrays in the batch from {self.name}.collate (a "
                f"{type(batch).__name__}) into tensors: {type(e).__name__}: {e} (at {_where(e)}). Return the batch "
                "as tensors or numpy arrays in tuples, lists, dicts, namedtuples or dataclasses."
            ) from e

    def failed(self, exc: Exception, where: str | None = None) -> None:
        self.in_a_row += 1
        error = f"{type(exc).__name__}: {exc} (at {where or _where(exc)})"
        if self.max_bad_in_a_row is not None and self.in_a_row >= self.max_bad_in_a_row:
            raise DatasetError(
                f"{self.in_a_row} batches in a row from {self.name} failed to collate (max_bad_samples_in_a_row="
                f"{self.max_bad_in_a_row}, which also counts batches that fail to collate). Last error: {error}"
            ) from exc
        self.warning(f"Skipping a batch from {self.name} that failed to collate: {error}", lambda: f"the last: {error}")


def _source(function: Any) -> str:
    """Where a function (or method) is defined, as `path:line`."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else "unknown"


def check_dataset(dataset: Any, phase: str, task_name: str) -> Any:
    if isinstance(dataset, DpshdlDataset | TorchDataset):
        return dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, str | bytes):
        return dataset
    raise DatasetError(
        f"{task_name}.get_dataset({phase!r}) returned {type(dataset).__name__}, which is not a dataset. "
        "Return a dpshdl Dataset, a torch.utils.data.Dataset (map-style) or a torch IterableDataset."
    )


WORKERS_PER_CORE = 8  # More dataloader workers per usable core than this is a typo, not a setting.


def check_num_workers(num_workers: int) -> None:
    """A ConfigError for a worker count far above this machine's cores: each worker is a process holding a copy of
    the dataset, so 100000 of them forked until the machine ran out of memory (torch only warns)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers > WORKERS_PER_CORE * cores:
        raise ConfigError(
            f"num_dataloader_workers={num_workers} is more than {WORKERS_PER_CORE} worker processes per CPU core "
            f"this process can use ({cores} cores: at most {WORKERS_PER_CORE * cores}); each one is a process with a "
            f"copy of the dataset. Set num_dataloader_workers to at most the core count ({cores}) or a little above "
            "for data loading that waits on disk or network."
        )


def build_dataloader(
    dataset: Any,
    *,
    phase: str,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    max_bad_in_a_row: int | None = 100,
    consumed: Any = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The training loader is resumable (see `mlfab.loader`); evaluation loaders are `EvaluationLoader`s.

    Each loader draws its shuffling and worker seeds from a generator of its own, never from torch's
    global one, so how often validation runs cannot change the training run's random numbers.
    """
    check_num_workers(num_workers)
    os.environ[_RANK_ENV], os.environ[_WORLD_ENV] = str(rank), str(world_size)
    own_collate = getattr(dataset, "collate", None)
    collate = Collate(own_collate if callable(own_collate) else None, max_bad_in_a_row, type(dataset).__name__)
    is_train = phase == "train"
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0 and is_train,  # (Evaluations: see `EvaluationLoader`.)
        "worker_init_fn": worker_init if num_workers > 0 else None,
        # Its own stream per phase and rank: workers' seeds (their torch, numpy and random streams) derive from it.
        # Map-style data still shuffles the same way on every rank, as Lightning's distributed sampler must to split
        # that one order by rank: its order comes from its own seed (PL_GLOBAL_SEED), not from this generator.
        "generator": torch.Generator().manual_seed(seed + (0 if is_train else 1) + 2 * rank),
    }
    loader_cls: Any = EvaluationLoader
    if is_train:
        loader_cls, kwargs["consumed"] = MlfabLoader, consumed
    if isinstance(dataset, DpshdlDataset):
        return loader_cls(DpshdlIterable(dataset, max_bad_in_a_row), **kwargs)
    if isinstance(dataset, IterableDataset):
        own_state = callable(getattr(dataset, "state_dict", None)) and callable(
            getattr(dataset, "load_state_dict", None)
        )
        return loader_cls(IterableStateful(dataset) if is_train and not own_state else dataset, **kwargs)
    # Map-style: shuffle for training, full equal-size batches so accumulation matches one big batch;
    # validation sees the same leading batches every time, so its curve is comparable over time.
    if not is_train and len(dataset) == 0:  # Lightning only warns, and every evaluation would be skipped.
        limit = "valid_batches=0 (no validation)" if phase == "valid" else f"no {phase} subcommand"
        raise DatasetError(
            f"get_dataset({phase!r}) has no samples, so there would be nothing to evaluate. Check it (a split or "
            f"filter that keeps nothing?), or run with {limit}."
        )
    if is_train and len(dataset) // world_size < batch_size:
        per_process = f" ({len(dataset) // world_size} per process)" if world_size > 1 else ""
        raise DatasetError(
            f"get_dataset('train') has {len(dataset)} samples{per_process}, fewer than one batch (batch_size="
            f"{batch_size}), so training would do nothing. Lower batch_size or add data."
        )
    if is_train:
        dataset = MapStateful(dataset)
    if not is_train and world_size > 1:
        kwargs["sampler"] = _evaluation_split(dataset, rank, world_size)
    if is_train and world_size > 1:  # Each epoch's order from the seed and the epoch alone, so a resume (which skips
        # what the epoch drew) draws it again: Lightning's own wraps a sampler whose generator is not restored.
        kwargs["sampler"] = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed + 3, drop_last=True)
    loader = loader_cls(dataset, shuffle=is_train and world_size == 1, drop_last=is_train, **kwargs)
    if is_train and world_size == 1:  # The order from a generator of its own: the loader's also seeds each new
        loader.sampler.generator = torch.Generator().manual_seed(seed + 3)  # iterator, which a resume draws again.
    return loader


class EvaluationLoader(DataLoader):
    """An evaluation's DataLoader: each pass starts its workers afresh, from the same seeds (its generator set back to
    its seed), so every evaluation draws the same random numbers in them, whatever came before: a resumed run's
    evaluations are the uninterrupted run's, and their curve moves with the model only. (Without workers the data
    draws from the process's own generators, which a checkpoint keeps.)"""

    @override
    def __iter__(self) -> Any:
        if self.num_workers > 0 and self.generator is not None:
            self.generator.manual_seed(self.generator.initial_seed())
        return super().__iter__()


def _evaluation_split(dataset: Any, rank: int, world_size: int) -> Any:
    """This rank's share of a map-style validation or test set, each sample evaluated once over all ranks (ranks may
    get one sample more than others). Lightning's own split pads the shares to equal sizes with repeated samples,
    which would count those twice in the means; it keeps a distributed sampler it is given.

    Unequal shares are safe for mlfab's evaluation: its only collectives are DDP's buffer broadcast at the first
    batch and one synchronised `self.log` per key at the end. So every rank needs one sample at least: a set
    smaller than the number of processes keeps Lightning's padded split (None), with a warning."""
    if len(dataset) < world_size:
        if rank == 0:
            log.warning(
                "The evaluation set has %d samples, fewer than the %d processes: Lightning's split evaluates some "
                "twice, which weighs them twice in its means. Evaluate on one process (devices=1) or add samples.",
                len(dataset),
                world_size,
            )
        return None
    return unrepeated_sampler(dataset, num_replicas=world_size, rank=rank)


def _failed_download(exc: BaseException) -> tuple[str, str] | None:
    """(url, path) of the dpshdl download that raised `exc`, found in the traceback's frames."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if obj is not None and type(obj).__name__ == "FileDownloader" and hasattr(obj, "filepath"):
            found = (str(getattr(obj, "url", "?")), str(obj.filepath))
        tb = tb.tb_next
    return found


def explain_dataset_failure(exc: Exception, task_name: str, phase: str) -> None:
    """Turns a failed download inside `get_dataset` into an error that says which file to put where."""
    if not isinstance(exc, urllib.error.URLError | ConnectionError | TimeoutError):
        return
    download = _failed_download(exc)
    if download is None:
        raise DatasetError(
            f"{task_name}.get_dataset({phase!r}) tried to download data and failed ({exc}). "
            "If this machine is offline, copy the dataset files into the data directory by hand."
        ) from exc
    url, path = download
    raise DatasetError(
        f"{task_name}.get_dataset({phase!r}) could not download {url} ({exc}).\n"
        f"If this machine is offline, download that file elsewhere and place it at:\n    {path}\n"
        f"(the dataset's other files go in the same directory).\n"
        "(The data directory comes from mlfab.get_data_dir(): `directories.data` in ~/.mlfab.yml or DATA_DIR.)"
    ) from exc
