"""Dataloaders for whatever `get_dataset` returns: a dpshdl Dataset, a torch map-style or iterable dataset.

dpshdl datasets are endless iterators yielding numpy arrays; they are wrapped as a torch IterableDataset
whose workers each get `worker_init(global_worker_id, global_num_workers)` over ranks x dataloader workers.
Batches reach the task as torch tensors with their dtypes kept (uint8 images stay uint8).
"""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from dpshdl.dataset import Dataset as DpshdlDataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data._utils.collate import default_collate

from mlfab.errors import DatasetError


def to_torch(value: Any) -> Any:
    """numpy arrays (anywhere in tuples, lists, dicts, dataclass-free structures) -> torch tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)) if value.dtype != np.object_ else value
    if isinstance(value, np.generic):
        return torch.as_tensor(value)
    if isinstance(value, Mapping):
        return type(value)({k: to_torch(v) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(to_torch(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(to_torch(v) for v in value)
    return value


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DpshdlIterable(IterableDataset):
    """Runs a dpshdl dataset inside torch's DataLoader; each (rank, worker) is one dpshdl worker."""

    def __init__(self, dataset: DpshdlDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> DpshdlDataset:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = _rank_and_world()
        self.dataset.worker_init(rank * num_workers + worker_id, world * num_workers)
        return self.dataset


class Collate:
    """Uses the dataset's own `collate` when it has one, then turns numpy arrays into tensors."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        if self.collate is None:
            return default_collate(items)
        return to_torch(self.collate(items))


def check_dataset(dataset: Any, phase: str, task_name: str) -> Any:
    if isinstance(dataset, DpshdlDataset | TorchDataset):
        return dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, str | bytes):
        return dataset
    raise DatasetError(
        f"{task_name}.get_dataset({phase!r}) returned {type(dataset).__name__}, which is not a dataset. "
        "Return a dpshdl Dataset, a torch.utils.data.Dataset (map-style) or a torch IterableDataset."
    )


def build_dataloader(
    dataset: Any,
    *,
    phase: str,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    own_collate = getattr(dataset, "collate", None)
    collate = Collate(own_collate if callable(own_collate) else None)
    is_train = phase == "train"
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    if isinstance(dataset, DpshdlDataset):
        return DataLoader(DpshdlIterable(dataset), **kwargs)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **kwargs)
    # Map-style: shuffle for training, full equal-size batches so accumulation matches one big batch;
    # validation sees the same leading batches every time, so its curve is comparable over time.
    return DataLoader(dataset, shuffle=is_train, drop_last=is_train, **kwargs)


def _failed_download(exc: BaseException) -> tuple[str, str] | None:
    """(url, path) of the dpshdl download that raised `exc`, found in the traceback's frames."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if type(obj).__name__ == "FileDownloader" and hasattr(obj, "filepath"):
            found = (str(getattr(obj, "url", "?")), str(obj.filepath))
        tb = tb.tb_next
    return found


def explain_dataset_failure(exc: Exception, task_name: str, phase: str) -> None:
    """Turns a failed download inside `get_dataset` into an error that says which file to put where."""
    import urllib.error

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
