"""What a relaunch may change: each config key is applied by the resumed run or refused, never recorded and ignored.

- Refused (a ConfigError naming the key and both values): the keys whose old value lives on in the restored state.
- The default optimizer's keys: written into the restored optimizer's parameter groups (the checkpoint's
  optimizer state would otherwise keep the old values); refused when the task builds its own optimizer.
- Every other key is read afresh when the run starts (Trainer settings, cadences, limits, the task's own keys;
  a key that changes the model's shapes is refused by the checkpoint check).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mlfab.errors import ConfigError
from mlfab.optim import warmup_rate

REFUSED = {
    "seed": "the random state restored from the checkpoint continues the streams of the old seed",
    "batch_size": "the data stream's saved position counts batches of the old size",
    "num_dataloader_workers": "the data stream's saved position is kept per worker",
    "batches_per_step": "the restored batch count decides where each optimizer step ends: the first resumed step would "
    "take another number of batches than it is averaged over",
    # devices / num_nodes are judged by what they start: Task._check_resume refuses a different process count
    # (devices 'auto' -> 1 on a one-process machine changes nothing and resumes).
}
OPTIMIZER_KEYS = {  # Config key -> parameter group key (see mlfab.optim.schedule_free_adamw).
    "learning_rate": "base_lr",
    "betas": "betas",
    "weight_decay": "weight_decay",
    "warmup_steps": "linear_warmup_steps",
}


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


# Where the run lives, not how it trains: a resume into a run names it (`exp_dir` unset -> the run's directory), a
# `fit --ckpt_path` of another run's checkpoint starts another; neither is a changed setting.
PLACES = ("run_dir", "exp_dir")


def config_changes(
    saved: Mapping[str, Any], now: Mapping[str, Any], every_key: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (checkpoint's value, this launch's value), for every key that differs (a key only one of them
    has counts with `every_key`; else a key the checkpoint lacks, added to the config since, does not), but
    `PLACES`."""
    old, new = _flat(saved), _flat(now)
    keys = dict.fromkeys([*old, *new]) if every_key else [k for k in new if k in old]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and k not in PLACES}


def check_changes(
    changes: Mapping[str, tuple[Any, Any]],
    own_optimizer: bool,
    task: str,
    path: Any,
    optimizer_args: Mapping[str, tuple[Any, Any]] = {},  # noqa: B006 - read only
) -> None:
    """Refuses the changes a resumed run cannot apply, all at once; `optimizer_args` are the changes of the command
    line's `--optimizer` / `--lr_scheduler`, whose restored state would keep every old value."""
    problems = [f"{k}: {old!r} -> {new!r} ({REFUSED[k]})" for k, (old, new) in changes.items() if k in REFUSED]
    if own_optimizer:
        why = f"{task} builds its own optimizer, whose restored state keeps the old value"
        problems += [f"{k}: {old!r} -> {new!r} ({why})" for k, (old, new) in changes.items() if k in OPTIMIZER_KEYS]
    why = "the restored optimizer and scheduler state keep the old one"
    shown = {k.replace(".init_args.", "."): v for k, v in optimizer_args.items()}  # As typed: --optimizer.lr
    problems += [f"--{k}: {old!r} -> {new!r} ({why})" for k, (old, new) in shown.items()]
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"Cannot resume from {path} with these config changes:\n{listing}\nRelaunch with the values the run "
            "was started with (they are in its config.yaml), or start a new run (a new exp_dir)."
        )


def apply_optimizer_changes(optimizers: Iterable[torch.optim.Optimizer], changes: Mapping[str, tuple]) -> None:
    """The default optimizer's changed keys, written into the restored parameter groups."""
    for key, (_, new) in changes.items():
        name = OPTIMIZER_KEYS.get(key)
        if name is None:
            continue
        for opt in optimizers:
            for group in opt.param_groups:
                if name == "weight_decay" and not group.get("decay", True):
                    continue  # Biases, norms and embeddings never decay.
                # A group written before mlfab did the warmup itself holds schedule-free AdamW's own keys.
                own = (
                    name if name in group else {"base_lr": "lr", "linear_warmup_steps": "warmup_steps"}.get(name, name)
                )
                if own in group:
                    group[own] = tuple(new) if own == "betas" else new
                if own in ("base_lr", "linear_warmup_steps") and "base_lr" in group:
                    group["lr"] = group["warmup_lr"] = warmup_rate(group)  # Past the warmup, warm_up leaves it.


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
