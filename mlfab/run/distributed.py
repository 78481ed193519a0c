"""Devices, strategies and ranks: the config's hardware settings as Lightning Trainer arguments, and what a
process can know about its rank before and after the process group exists.

Lightning's launchers do the work: its DDP launcher starts the other local processes by re-running the
command line, and its cluster environments read torchrun's, Slurm's and the MASTER_ADDR / MASTER_PORT /
NODE_RANK variables. mlfab adds the two things they leave out: every rank agrees on one run directory,
and each rank (and each dataloader worker) gets its own share of the data.
"""

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mlfab.errors import ConfigError
from mlfab.run.slurm import hardware as slurm_hardware
from mlfab.run.slurm import shape_mismatch

log = logging.getLogger(__name__)

EXP_DIR_ENV = "MLFAB_EXP_DIR"  # Set by rank zero so the processes Lightning starts use its run directory.
PLACEHOLDER_PREFIX = "mlfab-rank-"  # A temporary folder a rank other than zero holds until it has rank zero's.


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"))


def env_rank_zero() -> bool:
    """Whether the launch environment makes this process global rank zero (true when nothing says otherwise).

    Read before the process group exists, to decide which process creates the run directory."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:  # Inside `srun`.
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def available_accelerators() -> list[str]:
    """The accelerators torch can use here, best first."""
    found = ["cuda"] if torch.cuda.is_available() else []
    return found + (["mps"] if torch.backends.mps.is_available() else []) + ["cpu"]


def _refuse_other_shape(given: list[str], launcher: str, started: dict[str, int], fix: str) -> None:
    """A ConfigError for config values (`given`, as `key=value`) that disagree with the processes a launcher started:
    they would be dropped for its shape while config.yaml kept them."""
    if given:
        verb = "disagree" if len(given) > 1 else "disagrees"
        raise ConfigError(
            f"{' and '.join(given)} {verb} with {launcher} started {started['devices']} process(es) per node on "
            f"{started['num_nodes']} node(s). Leave {' and '.join(g.split('=')[0] for g in given)} out, or {fix}."
        )


def resolve_hardware(accelerator: str, devices: Any, num_nodes: int, strategy: str) -> dict[str, Any]:
    """Trainer arguments for the config's hardware keys; a ConfigError when this machine lacks what they ask for."""
    started: dict[str, int] | None
    if under_torchrun():  # torchrun started the processes: match what it started.
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        started = {"devices": per_node, "num_nodes": max(int(os.environ["WORLD_SIZE"]) // per_node, 1)}
        given, _ = shape_mismatch(devices, num_nodes, started["devices"], started["num_nodes"])
        fix = "start torchrun with that shape (--nproc_per_node, --nnodes)"
        _refuse_other_shape(given, "torchrun, which", started, fix)
    elif (started := slurm_hardware()) is not None:  # srun started the processes: match what it started.
        given, wanted = shape_mismatch(devices, num_nodes, started["devices"], started["num_nodes"])
        fix = (
            f"with launcher='slurm' set {' and '.join(wanted)} (in your own batch script, sbatch's "
            "--ntasks-per-node and --nodes)"
        )
        _refuse_other_shape(given, "this Slurm job: srun", started, fix)
    if started is not None:  # Set in the config, devices / num_nodes would be dropped for the launcher's.
        devices, num_nodes = started["devices"], started["num_nodes"]
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if v not in os.environ]
    if num_nodes > 1 and started is None and missing:  # Lightning would wait for the other machines forever.
        raise ConfigError(
            f"num_nodes={num_nodes} without {', '.join(missing)}: run the same command on each machine with "
            "MASTER_ADDR and MASTER_PORT (the first machine's address and a free port) and NODE_RANK (0 to "
            f"{num_nodes - 1}) set, or launch with Slurm or torchrun."
        )
    available, asked = available_accelerators(), accelerator
    if accelerator == "auto":
        accelerator = available[0]
    elif accelerator == "gpu":  # Lightning's name for either kind of GPU.
        accelerator = available[0] if available[0] != "cpu" else "gpu"
    if accelerator not in available:
        raise ConfigError(_missing_accelerator(asked, available))
    if accelerator == "cpu" and "," in str(devices):  # Lightning would fail with a TypeError and a traceback.
        count = len([i for i in str(devices).split(",") if i.strip()])
        raise ConfigError(
            f"devices={devices} picks GPUs by index, but this run trains on the CPU (accelerator={asked}). Set "
            f"devices to a number of processes (devices={count}), or accelerator=cuda on a machine with GPUs."
        )
    if accelerator == "cuda" and not started and str(devices).isdigit() and int(devices) > torch.cuda.device_count():
        raise ConfigError(
            f"devices={devices}, but this machine has {torch.cuda.device_count()} CUDA GPU(s). Set devices to at "
            "most that number, or devices=auto to use every GPU."
        )
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "cuda" else 1
    if accelerator == "mps" and devices not in (1, "1"):
        log.warning("MPS supports one device; training on one instead of devices=%s.", devices)
        devices = 1
    many = int(devices) * num_nodes > 1 if str(devices).isdigit() else True
    if strategy == "auto" and many:
        strategy = "ddp"
    return {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy}


def broadcast_exp_dir(trainer: Any, exp_dir: Any) -> Any:
    """Rank zero's run directory, on every rank (after the process group exists). The empty placeholder a rank
    made while it waited for it (`PLACEHOLDER_PREFIX`) is removed."""
    if trainer.world_size == 1:
        return exp_dir
    chosen = trainer.strategy.broadcast(exp_dir, src=0)
    if exp_dir is None or chosen is None:  # A Trainer of the user's: no run directory.
        return chosen
    if Path(exp_dir) != Path(chosen) and Path(exp_dir).name.startswith(PLACEHOLDER_PREFIX):
        with contextlib.suppress(OSError):  # Only while empty: it was meant to hold nothing.
            Path(exp_dir).rmdir()
    return chosen


def _missing_accelerator(accelerator: str, available: list[str]) -> str:
    kind = {"cuda": "a CUDA GPU", "gpu": "a GPU", "mps": "an Apple MPS device"}.get(accelerator, repr(accelerator))
    if accelerator in ("cuda", "gpu") and torch.version.cuda is None:
        why = f" (this torch, {torch.__version__}, is built without CUDA)"
    elif accelerator in ("cuda", "gpu"):
        why = " (torch.cuda.is_available() is False: no GPU, or its driver does not load; see nvidia-smi)"
    else:
        why = ""
    return (
        f"accelerator={accelerator} asks for {kind}, but torch finds none on this machine{why}. "
        f"Available here: {', '.join(available)}. Set accelerator to one of them, or to auto."
    )


def union_over_ranks(trainer: pl.Trainer, *names: Iterable[str]) -> list[list[str]]:
    """Each of `names` (sets of tags) as the union of every rank's, sorted, the same on every rank (one all-gather
    of them all), so that every rank reduces the same tags in the same order: a value some ranks log (a per-class
    score of the classes in their batches) was paired with another tag's value by position, or the collectives
    waited for each other until gloo's timeout."""
    mine = [sorted(n) for n in names]
    if trainer.world_size == 1:
        return mine
    every: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(every, mine)
    return [sorted(set().union(*(rank[i] for rank in every))) for i in range(len(mine))]


def mean_over_ranks(
    trainer: pl.Trainer,
    means: dict[str, float],
    weights: dict[str, Any],
    device: torch.device,
    tags: Sequence[str],
) -> dict[str, float]:
    """Each scalar's mean over every rank's samples, from each rank's sample-weighted mean and weight, as Lightning's
    `self.log(..., batch_size=n, sync_dist=True)` reduces a validation value: one all-reduce of `tags`, the same on
    every rank (`union_over_ranks`), each rank's missing ones weighing 0 (a tag no rank has is left out)."""
    if trainer.world_size == 1:
        return means
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64.
    pairs = [[means[t] * float(weights[t]), float(weights[t])] if t in means else [0.0, 0.0] for t in tags]
    sums = trainer.strategy.reduce(torch.tensor(pairs, dtype=dtype, device=device), reduce_op="sum")
    return {tag: float(total / weight) for tag, (total, weight) in zip(tags, sums.tolist(), strict=True) if weight}


def process_group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def end_process_group(existed: bool) -> None:
    """Ends the process group a launch's run made (Lightning's DDP strategy leaves it, for a Trainer used again):
    left to the interpreter's exit, gloo's threads could abort the process after the run succeeded ("terminate
    called without an active exception", exit code -6), as torch warns. One that existed before the launch (a user's
    own) is theirs."""
    if not existed and process_group_exists():
        torch.distributed.destroy_process_group()
