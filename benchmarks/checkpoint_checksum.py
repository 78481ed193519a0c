"""What the checksum costs a checkpoint save: `AtomicCheckpointIO.save_checkpoint` (hashing the bytes as torch writes
them, then the `.sha256` file) against the same atomic save without it (torch.save into a temporary file, fsync,
rename), on a 100 MB checkpoint, alternating, medians of 7.

    python benchmarks/checkpoint_checksum.py [DIR]     # DIR on the disk your runs use (default: a temp dir)
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mlfab.checkpoints import AtomicCheckpointIO


def unhashed_save(checkpoint: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(where: Path, repeats: int = 7, tensors: int = 10) -> tuple[float, float]:
    where.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": {f"w{i}": torch.randn(2_500_000) for i in range(tensors)}}  # 10 MB each
    io = AtomicCheckpointIO()
    times: dict[str, list[float]] = {"unhashed": [], "mlfab": []}
    for _ in range(repeats):
        for name, save in (("unhashed", unhashed_save), ("mlfab", io.save_checkpoint)):
            start = time.perf_counter()
            save(checkpoint, where / f"{name}.ckpt")
            times[name].append(time.perf_counter() - start)
    base, ours = statistics.median(times["unhashed"]), statistics.median(times["mlfab"])
    size = (where / "mlfab.ckpt").stat().st_size / 1e6
    ratio = ours / base
    print(f"{size:.0f} MB checkpoint in {where}: without checksum {base * 1000:.0f} ms, with {ours * 1000:.0f} ms")
    print(f"ratio {ratio:.2f}x")
    return base, ours


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
