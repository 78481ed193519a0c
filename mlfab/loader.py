"""The training DataLoader: torchdata's StatefulDataLoader, made exact across a checkpoint.

StatefulDataLoader saves where the data stream is (each worker's dataset state, which worker is next).
Lightning fetches one batch ahead, so when a checkpoint is written the loader has already produced a
batch that was not trained on; restoring the loader alone would skip it. This loader remembers the batches
it produced that were not consumed yet and stores them in its state, and a restored loader yields them
first. Nothing is replayed from the start, so resuming costs the same at step 10 and at step 100000.

Under DDP each rank reads its own share of the data, so the state is every rank's (gathered when a checkpoint is
written, which every rank does), and a resumed rank takes its own.

A batch whose collation failed (None) is skipped here and counted.
"""

import collections
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from mlfab.errors import DatasetError

# torchdata calls a deprecated torch function on every iterator start; the warning is not the user's concern.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

    @override
    def __iter__(self) -> Iterator[Any]:
        # The underlying iterator is made now, not at the first `next`, so that whatever making it draws (the
        # loader's seeds come from its own generator; a dataset's `__iter__` may use the global ones) is drawn
        # before a resumed run restores the global generators' states.
        replay, self._replay = self._replay, []
        return self._batches(replay, super().__iter__())

    def _batches(self, replay: list[Any], inner: Iterator[Any]) -> Iterator[Any]:
        for batch in replay:
            yield self._note(batch)
        for batch in inner:
            if batch is None:  # The dataset's collate failed for this batch.
                self.skipped_batches += 1
                continue
            yield self._note(batch)
        if not self._ever_produced:  # Lightning would start a new epoch forever. (A resumed epoch may be empty.)
            name = type(getattr(self.dataset, "dataset", self.dataset)).__name__
            raise DatasetError(
                f"The training dataset ({name}) produced no batches. Check that get_dataset('train') "
                "returns a dataset with at least batch_size samples."
            )

    def _note(self, batch: Any) -> Any:
        self._ever_produced = True
        self._recent.append(batch)
        self._yielded += 1
        return batch

    def in_flight(self) -> list[Any]:
        """Batches produced but not yet trained on (normally the one Lightning prefetched)."""
        pending = self._yielded - self.consumed.count
        return list(self._recent)[-pending:] if pending > 0 else []

    @override
    def state_dict(self) -> dict[str, Any]:
        own = {"loader": super().state_dict(), "in_flight": self.in_flight(), "skipped": self.skipped_batches}
        if not _distributed():
            return own
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, own)  # Lightning saves rank zero's checkpoint dict: it holds every rank's.
        return {"ranks": everyone}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" in state_dict:  # Written by several processes (a resume needs as many: Task refuses other counts).
            ranks = state_dict["ranks"]
            rank = dist.get_rank() if _distributed() else 0
            state_dict = ranks[rank if rank < len(ranks) else 0]
        super().load_state_dict(state_dict["loader"])
        self._replay = list(state_dict.get("in_flight", []))
        self.skipped_batches = int(state_dict.get("skipped", 0))
        self._ever_produced = True  # It trained before it was saved.
        self._yielded = self.consumed.count = 0
        self._recent.clear()

    def bad_samples(self) -> int:
        """Samples skipped because loading them raised, over all workers (as last reported)."""
        state = super().state_dict()  # The main process's dataset state, or each worker's.
        workers = state.get("_snapshot", {}).get("_worker_snapshots", {}).values()
        datasets = [state["dataset_state"]] if "dataset_state" in state else [w.get("dataset_state") for w in workers]
        return sum(int((d or {}).get("bad_total", 0)) for d in datasets)
