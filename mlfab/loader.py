"""The training DataLoader: torchdata's StatefulDataLoader, made exact across a checkpoint.

StatefulDataLoader saves where the data stream is (each worker's dataset state, which worker is next).
Lightning fetches one batch ahead, so when a checkpoint is written the loader has already produced a
batch that was not trained on; restoring the loader alone would skip it. This loader remembers the batches
it produced that were not consumed yet and stores them in its state, and a restored loader yields them
first. Nothing is replayed from the start, so resuming costs the same at step 10 and at step 100000.

Under DDP each rank reads its own share of the data, so the state is every rank's (gathered when a checkpoint is
written, which every rank does), and a resumed rank takes its own.

A batch whose collation failed (None) is skipped here and counted.

A batch in flight is stored as data torch's safe loading (`weights_only=True`) reads: a dataclass, namedtuple or
mapping other than a dict (dpshdl's collate of dataclass samples, a `defaultdict`) as a dict naming its type, which
the restored loader looks up among the modules already imported (the task's and its dataset's) and rebuilds.
"""

import collections
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.distributed as dist
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from mlfab.errors import CheckpointError, DatasetError

# torchdata calls a deprecated torch function on every iterator start; the warning is not the user's concern.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _say(message: str) -> None:
    """On stderr, once for the run: by rank zero (every rank finds the same)."""
    if not _distributed() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


class Consumed:
    """How many batches the training loop finished; shared between the task and its loader."""

    def __init__(self) -> None:
        self.count = 0


class MlfabLoader(StatefulDataLoader):
    def __init__(self, *args: Any, consumed: Consumed | None = None, **kwargs: Any) -> None:  # noqa: D107
        kwargs.setdefault("snapshot_every_n_steps", 1)
        super().__init__(*args, **kwargs)
        self.consumed = consumed or Consumed()
        self._recent: collections.deque[Any] = collections.deque(maxlen=2)  # Lightning prefetches one batch.
        self._yielded = 0
        self._replay: list[Any] = []
        self.skipped_batches = 0
        self._ever_produced = False
        self._epoch_ran_out = False  # Whether the pass in progress ran out (see `state_dict`).
        self._cut = False  # Whether Lightning ended the epoch before the pass (see `epoch_ends_here`).
        self._pass_over = False  # Whether the pass a resume restored was abandoned there.
        self._next_pass_now = False  # The same, where the resumed fit starts the next epoch at once.

    @override
    def __iter__(self) -> Iterator[Any]:
        # The underlying iterator is made now, not at the first `next`, so that whatever making it draws (the
        # loader's seeds come from its own generator; a dataset's `__iter__` may use the global ones) is drawn
        # before a resumed run restores the global generators' states.
        replay, self._replay = self._replay, []
        self._epoch_ran_out = self._cut = False
        inner = super().__iter__()
        if self._pass_over:  # Saved where an epoch ended before its pass did (`epoch_ends_here`).
            self._pass_over, inner, replay = False, iter(()), []
        elif self._next_pass_now:  # The same, and Lightning starts the next epoch at once: its pass, from there.
            self._next_pass_now, inner, replay = False, super().__iter__(), []
        return self._batches(replay, inner)

    def _keep_sampler_epoch(self, saved: int | None) -> None:
        """A distributed sampler draws each epoch's order from the epoch Lightning gives it (`set_epoch`). A checkpoint
        written where a fit stopped mid-epoch (max_steps, a signal) counts that epoch as done, so its resume would draw
        the rest of the epoch, and each one after, in the next one's order. From a resume on, the sampler's epochs
        follow the saved one: Lightning's first after it is the saved one's, and so on."""
        sampler = self._epoch_sampler()
        if saved is None or sampler is None:
            return
        shift: list[int] = []
        own = type(sampler).set_epoch

        def set_epoch(epoch: int) -> None:
            shift[:] = shift or [saved - epoch]
            own(sampler, epoch + shift[0])

        sampler.epoch, sampler.set_epoch = saved, set_epoch

    def _epoch_sampler(self) -> Any:
        """The sampler with an epoch (a distributed one, in the batch sampler or the loader), or None."""
        for sampler in (getattr(self.batch_sampler, "sampler", None), self.sampler):
            if isinstance(getattr(sampler, "epoch", None), int):
                return sampler
        return None

    def _batches(self, replay: list[Any], inner: Iterator[Any]) -> Iterator[Any]:
        for batch in replay:
            yield self._note(batch)
        skipped = 0
        for batch in inner:
            if batch is None:  # The dataset's collate failed for this batch.
                self.skipped_batches += 1
                skipped += 1
                continue
            yield self._note(batch)
        self._epoch_ran_out = True
        if not self._ever_produced:  # Lightning would start a new epoch forever. (A resumed epoch may be empty.)
            name = type(getattr(self.dataset, "dataset", self.dataset)).__name__
            raise DatasetError(
                f"The training dataset ({name}) produced no batches: all {skipped} of its batches failed to collate "
                "(the warnings above say why)."
                if skipped
                else f"The training dataset ({name}) produced no batches. Check that get_dataset('train') "
                "returns a dataset with at least batch_size samples."
            )

    def _note(self, batch: Any) -> Any:
        self._ever_produced = True
        self._recent.append(batch)
        self._yielded += 1
        return batch

    def epoch_ends_here(self) -> None:
        """Lightning ends its epoch with the batch just started; where this pass has more (`limit_train_batches`), the
        pass is abandoned: a batch fetched ahead is never trained on, and the next epoch is a new pass. A checkpoint
        written from now on says so (`cut`): its resume, which first goes on with the pass it was saved in, as with
        one that ran out, finds that pass over instead of training the rest of it."""
        if self._epoch_ran_out:
            return
        self._cut = True
        if self._yielded > self.consumed.count + 1:  # The batch fetched ahead, beside the one about to be trained.
            self._yielded -= 1
            self._recent.pop()

    def in_flight(self) -> list[Any]:
        """Batches produced but not yet trained on (normally the one Lightning prefetched)."""
        pending = self._yielded - self.consumed.count
        return list(self._recent)[-pending:] if pending > 0 else []

    @override
    def state_dict(self) -> dict[str, Any]:
        in_flight = [stored(batch) for batch in self.in_flight()]
        own = {"loader": super().state_dict(), "in_flight": in_flight, "skipped": self.skipped_batches}
        if self._cut:
            own["cut"] = True
        if (length := self._length()) is not None:  # The position counts samples of a map-style set of this length.
            own["length"] = length
        if (sampler := self._epoch_sampler()) is not None:  # The epoch of the samples drawn next.
            own["sampler_epoch"] = sampler.epoch + self._epoch_ran_out
        if not _distributed():
            return own
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, own)  # Lightning saves rank zero's checkpoint dict: it holds every rank's.
        return {"ranks": everyone}

    @override
    def load_state_dict(self, state_dict: dict[str, Any], next_pass: bool = False) -> None:
        """`next_pass`: the fit resumed starts its next epoch at once (Lightning's loop restarts no epoch, after one
        that finished: mlfab restores the state itself), so the pass it was saved in is over."""
        if "ranks" in state_dict:  # Written by several processes (a resume needs as many: Task refuses other counts).
            ranks = state_dict["ranks"]
            rank = dist.get_rank() if _distributed() else 0
            state_dict = ranks[rank if rank < len(ranks) else 0]
        self.skipped_batches = int(state_dict.get("skipped", 0))
        cut, epoch = bool(state_dict.get("cut")), state_dict.get("sampler_epoch")
        self._keep_sampler_epoch(epoch + 1 if next_pass and cut and epoch is not None else epoch)
        super().load_state_dict(state_dict["loader"])
        self._replay = [restored(batch) for batch in state_dict.get("in_flight", [])]
        self._pass_over, self._next_pass_now = cut and not next_pass, cut and next_pass
        if getattr(type(self.dataset), "replays", False):  # (The wrapper's, not an attribute of the user's set.)
            name = type(getattr(self.dataset, "dataset", self.dataset)).__name__
            _say(
                f"The training set ({name}) has no state_dict: the resume draws again the samples of the pass in "
                "progress it had drawn, and drops them (right where each pass yields the same samples in the same "
                "order; a state_dict / load_state_dict of its own goes on without drawing them)."
            )
        saved, now = state_dict.get("length"), self._length()
        if saved is not None and saved != now:
            _say(
                f"The training set has {now} samples, {saved} when the checkpoint was written: the rest of the epoch "
                "it was saved in is drawn from the new set at the saved position (so some of its samples come again "
                "in that epoch, others not at all); each later epoch is the new set's, whole."
            )
        self._ever_produced = True  # It trained before it was saved.
        self._yielded = self.consumed.count = 0
        self._recent.clear()

    @staticmethod
    def pass_ended(state: dict[str, Any]) -> bool:
        """Whether a `state_dict` was saved where Lightning ended the epoch before the pass (`epoch_ends_here`)."""
        return bool((state.get("ranks") or [state])[0].get("cut"))

    def _length(self) -> int | None:
        """The number of samples of a map-style training set (an iterable's position is its own to keep)."""
        try:
            return None if isinstance(self.dataset, IterableDataset) else len(self.dataset)
        except TypeError:  # A map-style set without a length.
            return None

    def bad_samples(self) -> int:
        """Samples skipped because loading them raised, over all workers (as last reported)."""
        state = super().state_dict()  # The main process's dataset state, or each worker's.
        workers = state.get("_snapshot", {}).get("_worker_snapshots", {}).values()
        datasets = [state["dataset_state"]] if "dataset_state" in state else [w.get("dataset_state") for w in workers]
        return sum(int((d or {}).get("bad_total", 0)) for d in datasets)


_TYPE = "__mlfab_type__"  # The key of a stored container of a type of its own: `module:qualname`.


def stored(value: Any) -> Any:
    """`value` with each dataclass, namedtuple and mapping other than a dict in it made a dict naming its type."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: stored(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {_TYPE: _name(type(value)), "fields": fields}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {_TYPE: _name(type(value)), "items": [stored(item) for item in value]}
    if isinstance(value, Mapping):
        items = {key: stored(item) for key, item in value.items()}
        if type(value) is dict:
            return items
        factory = getattr(value, "default_factory", None)
        return {_TYPE: _name(type(value)), "items": list(items.items()), "factory": factory and _name(factory)}
    if isinstance(value, list | tuple):
        return type(value)(stored(item) for item in value)
    return value


def restored(value: Any) -> Any:
    """The batch `stored` stored."""
    if isinstance(value, list | tuple):
        return type(value)(restored(item) for item in value)
    if not isinstance(value, dict):
        return value
    if _TYPE not in value:
        return {key: restored(item) for key, item in value.items()}
    cls: Any = _named(value[_TYPE])
    make: Callable[..., Any] = cls
    if "fields" in value and dataclasses.is_dataclass(cls):
        return make(**{name: restored(item) for name, item in value["fields"].items()})
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return cls(*(restored(item) for item in value["items"]))
    if issubclass(cls, Mapping):
        items = [(key, restored(item)) for key, item in value["items"]]
        if issubclass(cls, collections.defaultdict):
            return cls(value["factory"] and _named(value["factory"]), items)
        return cls(items)
    raise CheckpointError(f"The checkpoint's batch in flight names {value[_TYPE]}, which is no container of a batch.")


def _name(cls: Any) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _named(name: str) -> type:
    """The class `module:qualname` names (a batch's container, or a defaultdict's factory), from a module already
    imported: a checkpoint never imports a module, nor calls anything but such a class."""
    module, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type):  # Only a class is called (a batch's container, a defaultdict's factory).
        raise CheckpointError(
            f"The checkpoint's batch in flight holds a {name}, which is not found among the modules imported: define "
            "it at the top level of the module of your task or dataset (not inside a function), so that a resumed "
            "run finds it."
        )
    return found
