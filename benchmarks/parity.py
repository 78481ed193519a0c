"""mlfab against a hand-written PyTorch loop and idiomatic Lightning: speed, start-up, memory and data loading.

Training runs side by side in this process, alternating, on the same model, data, optimizer and seed:

- raw: a hand-written loop (zero_grad, forward, cross-entropy, backward, AdamW step) over a torch DataLoader;
- Lightning: a LightningModule calling `self.log("loss", loss)` every step, Lightning's defaults otherwise
  (TensorBoardLogger, no progress bar, checkpointing and model summary off);
- mlfab: an `mlfab.Task` trained by the Trainer that `mlfab.run.trainer.build_trainer` makes from its Config,
  logging its loss every step with `mlfab.StdoutLogger` and `mlfab.TensorboardLogger` attached. For the seed
  CNN it is the seed example's `MnistClassification` itself, given synthetic data and the shared optimizer;
- for the tiny MLP also Lightning in `Trainer(barebones=True)` mode (its mode for measuring its own overhead: no
  `self.log`, no logger, no checkpointing): the cost of Lightning's loop alone, the floor for anything that
  trains through `Trainer.fit`.

All of them draw identical batches in identical order (a fixed, seeded sample sequence, batch size 16) and
use `torch.optim.AdamW(lr=1e-3, weight_decay=1e-4)`. mlfab keeps its defaults except where they would make it
train differently from the others: no validation (`valid_batches=0`) and no gradient clipping
(`clip_grad_norm=null`; its non-finite check stays on). Its hourly checkpoint callback stays on (it never comes
due in the timed window); its final `last.ckpt` is written after the timed window. Steps are timed after a warmup,
the same for all; every run keeps its per-step losses (detached tensors, read after the run) and all must agree
to 1e-5.

The seed CNN also runs compiled: mlfab with `compile=true` against the raw loop eager and the raw loop compiled the
same way (`nn.Module.compile`, torch's defaults), alternating; the first run of each pays the compile in its warmup
steps. The full run ends with benchmarks/checkpoint_stall.py's measurement (training blocked per periodic save of a
100M-parameter model, synchronous and with `async_checkpoints`).

Also measured, in fresh subprocesses: `import mlfab` against `import lightning.pytorch`; the time from process
start to the end of the first optimizer step and the peak RSS of a seed-CNN run (mlfab through `Task.launch`,
as a user runs it); and batches/s of mlfab's training loader over a dpshdl dataset against dpshdl's own
`Dataloader`, with 0 and 2 workers.

    python benchmarks/parity.py            # the full run, with the checkpoint stall: about 8 minutes on 2 CPU cores
    python benchmarks/parity.py --quick    # fewer steps and repeats, about 1.5 minutes
    python benchmarks/parity.py --profile  # where the tiny MLP's step time goes (cProfile): raw, Lightning, mlfab
    python benchmarks/parity.py --floor    # how low a Lightning step goes: barebones, mlfab's savings, manual
"""

import argparse
import collections
import contextlib
import functools
import gc
import inspect
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

# Only torch is imported up here (Lightning and mlfab on first use), so a child process pays the start-up of
# the one framework it runs.
ROOT = Path(__file__).resolve().parents[1]
SEED = 1337
BATCH_SIZE = 16
OPTIMIZER = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-4}
LOSS_TOLERANCE = 1e-5
ON_CPU = {"accelerator": "cpu", "devices": 1}  # Like the raw loop, also on a machine with a GPU.
VARIANTS = ("raw", "lightning", "mlfab")
NAMES = {
    "raw": "raw loop",
    "bare": "Lightning barebones",
    "lightning": "Lightning",
    "mlfab": "mlfab",
    "lean": "Lightning barebones with mlfab's dispatch savings",
    "lean_manual": "the same with manual optimization",
    "raw_compiled": "raw loop compiled",
    "mlfab_compiled": "mlfab with compile=true",
}
COMPILED_LOSS_TOLERANCE = 1e-3  # Compiled kernels round differently; over the run the curves may drift this far.


@dataclass(frozen=True)
class Plan:
    mlp_repeats: int  # in-process runs of each variant
    mlp_steps: int  # timed steps per run
    mlp_warmup: int  # steps before the timed ones
    cnn_repeats: int
    cnn_steps: int
    cnn_warmup: int
    import_repeats: int
    start_repeats: int  # subprocesses per variant for the time to the first step and the peak memory
    start_steps: int
    loader_batches: int
    loader_warmup: int
    retry_scale: float  # of each section's time for repeating disturbed measurements


FULL = Plan(
    mlp_repeats=5,
    mlp_steps=2000,
    mlp_warmup=100,
    cnn_repeats=8,
    cnn_steps=120,
    cnn_warmup=20,
    import_repeats=5,
    start_repeats=3,
    start_steps=20,
    loader_batches=1500,
    loader_warmup=100,
    retry_scale=1.0,
)
QUICK = Plan(
    mlp_repeats=3,
    mlp_steps=600,
    mlp_warmup=50,
    cnn_repeats=3,
    cnn_steps=40,
    cnn_warmup=10,
    import_repeats=3,
    start_repeats=1,
    start_steps=10,
    loader_batches=400,
    loader_warmup=50,
    retry_scale=0.4,
)


def quiet() -> None:
    """Lightning's info lines (GPU available, ...) and warnings (few dataloader workers, ...) are not results.
    Importing Lightning sets its loggers back to INFO, so this runs again after that import."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------------------
# Models and data, shared by every variant.


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    """The seed example's model (examples/mnist.py with `in_dim=1`); `check_seed_cnn` checks they still match."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}


def prepare(model: str, x: Tensor) -> Tensor:
    """The seed's input transform for the CNN (uint8 images to [0, 1], one channel); the MLP takes x as it is."""
    return (x.float() / 255.0).unsqueeze(1) if model == "cnn" else x


@functools.cache
def samples(model: str, n: int = 2048) -> tuple[Tensor, Tensor]:
    """Seeded inputs with labels a model can learn: random features labelled by a fixed linear map (MLP), or
    MNIST-sized uint8 images with a bright square placed by the label (CNN)."""
    gen = torch.Generator().manual_seed(0)
    if model == "mlp":
        x = torch.randn(n, 32, generator=gen)
        return x, (x @ torch.randn(32, 10, generator=gen)).argmax(-1)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.randint(0, 40, (n, 28, 28), generator=gen, dtype=torch.uint8)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 5)
        x[i, 4 + r * 10 : 12 + r * 10, 1 + c * 5 : 5 + c * 5] = 255
    return x, y


class Samples(IterableDataset):
    """The same samples in the same order, endlessly; every variant batches them with a DataLoader."""

    def __init__(self, model: str) -> None:
        self.x, self.y = samples(model)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            for i in range(len(self.y)):
                yield self.x[i], self.y[i]


def optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), **OPTIMIZER)


# ---------------------------------------------------------------------------------------------------------------------
# The variants. The Lightning and mlfab classes are made on first use, so the raw child never imports them.


@dataclass
class Run:
    seconds_per_step: float
    losses: list[float]


def train_raw(
    model: str, steps: int, warmup: int, on_first_step: Callable[[], None] | None = None, compiled: bool = False
) -> Run:
    torch.manual_seed(SEED)
    net = MODELS[model]()
    if compiled:  # torch.compile's defaults, as mlfab's `compile=true`. (`net.compile()` on an nn.Sequential, whose
        net = torch.compile(net)  # forward is torch's own, compiled nothing: this arm ran eagerly.)
    opt = optimizer(net)
    net.train()
    losses: list[Tensor] = []
    start = end = 0.0
    for step, (x, y) in enumerate(DataLoader(Samples(model), batch_size=BATCH_SIZE), start=1):
        opt.zero_grad()
        loss = F.cross_entropy(net(prepare(model, x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if step == 1 and on_first_step is not None:
            on_first_step()
        if step == warmup:
            start = time.perf_counter()
        if step == warmup + steps:
            end = time.perf_counter()
            break
    return Run((end - start) / steps, torch.stack(losses).tolist())


@functools.cache
def lightning_classes() -> dict[str, type]:
    import lightning.pytorch as pl

    quiet()

    class LitClassifier(pl.LightningModule):
        """Idiomatic Lightning: the loss through `self.log` every step."""

        log_loss = True

        def __init__(self, model: str) -> None:
            super().__init__()
            self.model_name = model
            self.model = MODELS[model]()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(prepare(self.model_name, x)), y)
            if self.log_loss:
                self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Samples(self.model_name), batch_size=BATCH_SIZE)

    class BareClassifier(LitClassifier):
        """Lightning's loop alone: nothing logged."""

        log_loss = False

    class LeanClassifier(BareClassifier):
        """Lightning's loop with mlfab's savings on hook dispatch (`mlfab/task.py`; the Trainer gets mlfab's
        profiler): `_current_fx_name` set directly and `training_step`'s signature made once."""

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "_current_fx_name":
                object.__setattr__(self, name, value)
            else:
                super().__setattr__(name, value)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return super().training_step(batch, batch_idx)

    class LeanManualClassifier(LeanClassifier):
        """The same with manual optimization: Lightning's optimizer wrapper and backward, no closure."""

        def __init__(self, model: str) -> None:
            super().__init__(model)
            self.automatic_optimization = False

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            opt = self.optimizers()
            opt.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            return loss.detach()

    for cls in (LeanClassifier, LeanManualClassifier):
        cls.training_step.__signature__ = inspect.signature(cls.training_step)  # type: ignore[attr-defined]

    class StepTimer(pl.Callback):
        """Times the steps after the first `warmup` and keeps every step's loss (as a detached tensor)."""

        def __init__(self, warmup: int, on_first_step: Callable[[], None] | None = None) -> None:
            self.warmup = warmup
            self.on_first_step = on_first_step
            self.start = self.end = 0.0
            self.losses: list[Tensor] = []

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, *args: Any) -> None:
            self.losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
            if trainer.global_step == 1 and self.on_first_step is not None:
                self.on_first_step()
                self.on_first_step = None
            if trainer.global_step == self.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

        def run(self, steps: int) -> Run:
            return Run((self.end - self.start) / steps, torch.stack(self.losses).tolist())

    return {
        "lightning": LitClassifier,
        "bare": BareClassifier,
        "lean": LeanClassifier,
        "lean_manual": LeanManualClassifier,
        "StepTimer": StepTimer,
    }


def train_lightning(
    model: str,
    steps: int,
    warmup: int,
    log_dir: Path,
    kind: str = "lightning",
    on_first_step: Callable[[], None] | None = None,
) -> Run:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    classes = lightning_classes()
    pl.seed_everything(SEED, verbose=False)
    module = classes[kind](model)
    timer = classes["StepTimer"](warmup, on_first_step)
    if kind == "bare":  # Lightning's own mode for measuring its overhead: no logging, checkpoints, summary, ...
        trainer = pl.Trainer(max_steps=warmup + steps, barebones=True, callbacks=[timer], **ON_CPU)
    elif kind.startswith("lean"):  # Barebones has no profiler argument: the same settings, given one by one.
        from mlfab._lightning import no_profiler

        trainer = pl.Trainer(
            max_steps=warmup + steps,
            logger=False,
            callbacks=[timer],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            profiler=no_profiler(),
            **ON_CPU,
        )
    else:
        trainer = pl.Trainer(
            max_steps=warmup + steps,
            logger=TensorBoardLogger(str(log_dir)),
            callbacks=[timer],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            **ON_CPU,
        )
    trainer.fit(module)
    return timer.run(steps)


@functools.cache
def mlfab_classes() -> dict[str, type]:
    import mlfab

    quiet()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.mnist import MnistClassification

    @dataclass(kw_only=True)
    class MlpConfig(mlfab.Config):
        pass

    class MlpClassification(mlfab.Task[MlpConfig]):
        def __init__(self, config: MlpConfig) -> None:
            super().__init__(config)
            self.model = mlp()

        def get_dataset(self, phase: mlfab.Phase) -> Samples:
            return Samples("mlp")

        def forward(self, x: Tensor) -> Tensor:
            return self.model(x)

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            x, y = batch
            yhat = self(x)
            self.log_step(batch, yhat, state)
            return F.cross_entropy(yhat, y)

        def build_optimizer(self) -> torch.optim.Optimizer:
            return optimizer(self)

    class SeedCnn(MnistClassification):
        """The seed example's task as it is, on the shared synthetic images and optimizer."""

        def get_dataset(self, phase: mlfab.Phase) -> Samples:
            return Samples("cnn")

        def build_optimizer(self) -> torch.optim.Optimizer:
            return optimizer(self)

    return {"mlp": MlpClassification, "cnn": SeedCnn}


def mlfab_config(model: str, max_steps: int, **where: Any) -> Any:
    task = mlfab_classes()[model]
    return task.config_class()(
        batch_size=BATCH_SIZE,
        max_steps=max_steps,
        seed=SEED,
        valid_every_n_steps=None,
        valid_batches=0,
        clip_grad_norm=None,
        precision="32-true",
        **ON_CPU,
        **where,
    )


def train_mlfab(model: str, steps: int, warmup: int, exp_dir: Path, compiled: bool = False) -> Run:
    import lightning.pytorch as pl

    import mlfab
    from mlfab.run.trainer import build_trainer

    config = mlfab_config(model, warmup + steps, exp_dir=str(exp_dir), compile=compiled)
    pl.seed_everything(config.seed, workers=True, verbose=False)  # As `launch` does before it builds the task.
    task = mlfab_classes()[model](config)
    loggers = [mlfab.StdoutLogger(stream=io.StringIO()), mlfab.TensorboardLogger(exp_dir)]
    timer = lightning_classes()["StepTimer"](warmup)
    trainer = build_trainer(config, exp_dir, loggers, [timer])
    with contextlib.redirect_stdout(io.StringIO()):  # "Saved checkpoint ..." when training ends.
        trainer.fit(task)
    return timer.run(steps)


def train(variant: str, model: str, steps: int, warmup: int, tmp: Path) -> Run:
    if variant in ("raw", "raw_compiled"):
        return train_raw(model, steps, warmup, compiled=variant == "raw_compiled")
    if variant in ("lightning", "bare", "lean", "lean_manual"):
        return train_lightning(model, steps, warmup, tmp, kind=variant)
    return train_mlfab(model, steps, warmup, tmp, compiled=variant == "mlfab_compiled")


def check_seed_cnn() -> None:
    mlfab_classes()  # Puts the repository root on sys.path.
    from examples.mnist import Config, MnistClassification

    if repr(MnistClassification(Config(batch_size=BATCH_SIZE)).model) != repr(cnn()):
        raise SystemExit("benchmarks/parity.py: cnn() no longer matches the model in examples/mnist.py; update it.")


# ---------------------------------------------------------------------------------------------------------------------
# Measurements.


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds the whole machine has been busy (every process, and steal time where a hypervisor reports it)
    and this process has used with its finished children; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system + own.children_user + own.children_system


class Guard:
    """Runs each measurement again (at most twice, and only within the time `allow` gives) when other processes
    used more than `limit` of the machine's CPUs meanwhile: on 2 cores a busy neighbour changes step times
    several-fold. (Only this machine's processes are seen, not a hypervisor's other guests.)"""

    def __init__(self, limit: float = 0.1) -> None:
        self.limit = limit
        self.deadline = 0.0
        self.others: list[float] = []  # Share of the machine other processes used, per kept measurement.
        self.repeated = 0

    def allow(self, seconds: float) -> None:
        """Measurements repeat only in the next `seconds`, so a busy machine cannot stretch the run for long."""
        self.deadline = time.perf_counter() + seconds

    def run(self, measure: Callable[..., Any], *args: Any) -> Any:
        for attempt in range(3):
            before, t = cpu_seconds(), time.perf_counter()
            result = measure(*args)
            after, wall = cpu_seconds(), time.perf_counter() - t
            if before is None or after is None:
                return result
            others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (wall * (os.cpu_count() or 1))
            if others <= self.limit or attempt == 2 or time.perf_counter() > self.deadline:
                break
            self.repeated += 1
        self.others.append(others)
        return result

    def summary(self) -> str:
        if not self.others:
            return "other processes' CPU use not measured (no /proc/stat)"
        busy = sum(o > self.limit for o in self.others)
        warning = (
            "\n\n**The machine was busy: these numbers are not comparable with a quiet run; run again later.**"
            if busy > len(self.others) // 4
            else ""
        )
        return (
            f"other processes used {statistics.median(self.others):.0%} (median) and at most "
            f"{max(self.others):.0%} of the CPUs during the {len(self.others)} measurements kept; "
            f"{self.repeated} repeated for using more than {self.limit:.0%}, {busy} kept above it{warning}"
        )


@dataclass
class Bench:
    plan: Plan
    guard: Guard
    progress: Callable[[str], None]

    def section(self, name: str, retry_seconds: float) -> None:
        self.progress(name)
        self.guard.allow(retry_seconds * self.plan.retry_scale)


def training_parity(bench: Bench) -> dict[str, Any]:
    """Alternating in-process runs; the order of the variants rotates every repeat."""
    plan = bench.plan
    bench.section("training", retry_seconds=120)
    return {
        "mlp": alternate(
            bench, "mlp", ("raw", "bare", "lightning", "mlfab"), plan.mlp_repeats, plan.mlp_steps, plan.mlp_warmup
        ),
        "cnn": alternate(bench, "cnn", VARIANTS, plan.cnn_repeats, plan.cnn_steps, plan.cnn_warmup),
        # The first compiled run of each pays the compile (or reads torch's on-disk cache) in its warmup steps.
        "cnn_compiled": alternate(
            bench, "cnn", ("raw", "raw_compiled", "mlfab_compiled"), plan.cnn_repeats, plan.cnn_steps, plan.cnn_warmup
        ),
    }


def alternate(
    bench: Bench, model: str, variants: tuple[str, ...], repeats: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Medians of `repeats` runs of each variant, in the same process, the order rotated every repeat; every
    loss curve compared with the raw loop's."""
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            bench.progress(f"training {model}: repeat {r + 1}/{repeats}")
            for i in range(len(variants)):
                variant = variants[(r + i) % len(variants)]
                where = Path(tmp) / f"{model}_{variant}_{r}"
                runs[variant].append(bench.guard.run(train, variant, model, steps, warmup, where))
                gc.collect()
    reference = np.array(runs["raw"][0].losses)
    diff = max(float(np.abs(np.array(run.losses) - reference).max()) for rs in runs.values() for run in rs)
    return {
        "steps_per_s": {v: 1.0 / statistics.median(run.seconds_per_step for run in rs) for v, rs in runs.items()},
        "loss_diff": diff,
        "num_losses": len(reference),
    }


def floor_study(bench: Bench) -> None:
    """How low a Lightning step can go on this machine: the tiny MLP in barebones Lightning, with the dispatch
    savings mlfab applies, and with manual optimization on top, beside the raw loop and mlfab."""
    plan = bench.plan
    bench.section("floor", retry_seconds=120)
    variants = ("raw", "bare", "lean", "lean_manual", "mlfab")
    t = alternate(bench, "mlp", variants, plan.mlp_repeats, plan.mlp_steps, plan.mlp_warmup)
    rates = t["steps_per_s"]
    print(
        f"Tiny MLP, batch 16: medians of {plan.mlp_repeats} alternating runs of {plan.mlp_steps} steps; loss curves "
        f"agree to {t['loss_diff']:.1e}; {bench.guard.summary()}\n"
    )
    print("| variant | ms per step | vs raw loop | vs Lightning barebones |\n|---|---:|---:|---:|")
    for v in variants:
        ms, to_raw, to_bare = 1e3 / rates[v], rates[v] / rates["raw"], rates[v] / rates["bare"]
        print(f"| {NAMES[v]} | {ms:.3f} | {to_raw:.2f}x | {to_bare:.2f}x |")


def wall_time(command: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def import_times(bench: Bench) -> dict[str, Any]:
    bench.section("import times", retry_seconds=30)
    times: dict[str, list[float]] = {"mlfab": [], "lightning.pytorch": []}
    for _ in range(bench.plan.import_repeats):  # Alternating, so the machine's drift hits both alike.
        for name in times:
            times[name].append(bench.guard.run(wall_time, [sys.executable, "-c", f"import {name}"]))
    probe = "import sys, mlfab; print(' '.join(m for m in ('wandb', 'moviepy', 'soundfile') if m in sys.modules))"
    eager = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "eager_optional": eager}


def start_up(bench: Bench) -> dict[str, Any]:
    """Subprocesses training the seed CNN: process start to the end of the first optimizer step, and peak RSS."""
    plan = bench.plan
    bench.section("start-up and memory", retry_seconds=45)

    def run_child(variant: str) -> dict[str, float]:
        env = {**os.environ, "PARITY_T0": repr(time.time())}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--steps", str(plan.start_steps)],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PARITY_RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"child {variant} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return json.loads(lines[-1].removeprefix("PARITY_RESULT "))

    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(plan.start_repeats):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(r + i) % len(VARIANTS)]
            bench.progress(f"start-up and memory: {variant} ({r + 1}/{plan.start_repeats})")
            results[variant].append(bench.guard.run(run_child, variant))
    return {
        key: {v: statistics.median(r[key] for r in results[v]) for v in VARIANTS}
        for key in ("first_step_s", "peak_rss_mb")
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, since `ru_maxrss` also counts the memory of the
    process this one was forked from, before `exec`."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child(variant: str, steps: int) -> None:
    """One seed-CNN training run in a fresh process (started by `start_up`); prints a PARITY_RESULT line."""
    quiet()
    t0 = float(os.environ["PARITY_T0"])
    first: list[float] = []

    def mark() -> None:
        first.append(time.time())

    with tempfile.TemporaryDirectory() as tmp:
        if variant == "raw":
            train_raw("cnn", steps, 0, on_first_step=mark)
        elif variant == "lightning":
            train_lightning("cnn", steps, 0, Path(tmp), on_first_step=mark)
        else:
            task_cls = mlfab_classes()["cnn"]

            class Timed(task_cls):  # type: ignore[misc, valid-type]
                """The user's path, `Task.launch` with the task's own loggers; the hook only notes the time."""

                def on_train_batch_end(self, *args: Any) -> None:
                    super().on_train_batch_end(*args)
                    if self.global_step == 1 and not first:
                        mark()

            with contextlib.redirect_stdout(io.StringIO()):
                Timed.launch(mlfab_config("cnn", steps, run_dir=tmp), argv=[])
    peak_mb = peak_rss_mb()
    print("PARITY_RESULT " + json.dumps({"first_step_s": first[0] - t0, "peak_rss_mb": peak_mb}), flush=True)


def loader_throughput(bench: Bench) -> dict[int, dict[str, float]]:
    """Batches/s of mlfab's training loader and of dpshdl's own Dataloader over one dpshdl TensorDataset."""
    from dpshdl.dataloader import Dataloader
    from dpshdl.dataset import TensorDataset

    from mlfab.data import build_dataloader

    plan = bench.plan
    bench.section("dataloaders", retry_seconds=20)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(60000,)).astype(np.int64)

    def rate(batches: Iterator[Any]) -> float:
        for _ in range(plan.loader_warmup):  # Worker start-up and the first batches are not throughput.
            next(batches)
        t = time.perf_counter()
        for _ in range(plan.loader_batches):
            next(batches)
        return plan.loader_batches / (time.perf_counter() - t)

    def mlfab_rate(workers: int) -> float:
        loader = build_dataloader(
            TensorDataset(images, labels), phase="train", batch_size=BATCH_SIZE, num_workers=workers
        )
        it = iter(loader)
        try:
            return rate(it)
        finally:
            it.close()  # Drops torch's iterator, which stops its workers.
            del it, loader
            gc.collect()

    def dpshdl_rate(workers: int) -> float:
        dl = Dataloader(TensorDataset(images, labels), batch_size=BATCH_SIZE, num_workers=workers)
        try:
            with dl:
                return rate(iter(dl))
        finally:
            dl.manager.shutdown()  # Its multiprocessing manager outlives `with`.

    out: dict[int, dict[str, float]] = {}
    for workers in (0, 2):
        rates: dict[str, list[float]] = {"mlfab": [], "dpshdl": []}
        for r in range(2):
            bench.progress(f"dataloaders, {workers} workers ({r + 1}/2)")
            for name, measure in (("mlfab", mlfab_rate), ("dpshdl", dpshdl_rate))[:: 1 if r == 0 else -1]:
                rates[name].append(bench.guard.run(measure, workers))
                gc.collect()
        out[workers] = {k: max(v) for k, v in rates.items()}  # The better of two: noise only ever slows a run.
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report.


def row(what: str, mlfab: str, baseline: str, ratio: float | None, target: str, ok: bool | None) -> str:
    shown = "" if ratio is None else f"{ratio:.2f}x"
    result = "" if ok is None else ("PASS" if ok else "MISS")
    return f"| {what} | {mlfab} | {baseline} | {shown} | {target} | {result} |"


def steps_per_s(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} steps/s ({1e3 / value:.2f} ms)"
    return f"{value:.1f} steps/s ({1e3 / value:.1f} ms)"


def checkpoint_stall(bench: Bench) -> tuple[float, float] | None:
    """Training blocked per periodic save of a 100M-parameter model, synchronous and in the background
    (benchmarks/checkpoint_stall.py, same process); None in a --quick run."""
    if bench.plan is QUICK:
        return None
    bench.section("checkpoint stall (100M parameters, sync then async)", retry_seconds=0)
    import checkpoint_stall as stall

    quiet()
    width = 10_000
    sync = stall.run(width, 119, 40, background=False, parent=None)
    background = stall.run(width, 119, 40, background=True, parent=None)
    return sync.blocked, background.blocked


def report(
    plan: Plan,
    trained: dict[str, Any],
    imports: dict[str, Any],
    start: dict[str, Any],
    loaders: dict[int, dict[str, float]],
    stall: tuple[float, float] | None = None,
) -> list[str]:
    lines = ["| measurement | mlfab | compared with | ratio | target | result |", "|---|---|---|---|---|---|"]
    if stall is not None:
        ratio = stall[1] / stall[0]
        lines.append(
            row(
                "periodic save of 100M parameters (1.6 GB): training blocked per save, async_checkpoints",
                f"{stall[1]:.2f} s",
                f"synchronous save: {stall[0]:.2f} s",
                ratio,
                "<= 0.2x",
                ratio <= 0.2,
            )
        )
    for runs, label, variant, targets in (
        ("mlp", "tiny MLP", "mlfab", {"raw": 0.8, "lightning": 2.0, "bare": None}),
        ("cnn", "seed CNN", "mlfab", {"raw": 0.97, "lightning": None}),
        ("cnn_compiled", "seed CNN with compile=true", "mlfab_compiled", {"raw": 1.2, "raw_compiled": 0.95}),
    ):
        rates = trained[runs]["steps_per_s"]
        for base, target in targets.items():
            ratio = rates[variant] / rates[base]
            lines.append(
                row(
                    f"{label}, batch 16: steps/s vs {NAMES[base]}",
                    steps_per_s(rates[variant]),
                    f"{NAMES[base]}: {steps_per_s(rates[base])}",
                    ratio,
                    f">= {target}x" if target else "(info)",
                    None if target is None else ratio >= target,
                )
            )
    for model, label, tolerance in (
        ("mlp", "tiny MLP", LOSS_TOLERANCE),
        ("cnn", "seed CNN", LOSS_TOLERANCE),
        ("cnn_compiled", "seed CNN compiled (mlfab and raw)", COMPILED_LOSS_TOLERANCE),
    ):
        t = trained[model]
        lines.append(
            row(
                f"{label}: loss curves, max abs difference (every run, {t['num_losses']} steps each)",
                f"{t['loss_diff']:.1e}",
                "raw loop (eager)",
                None,
                f"<= {tolerance:.0e}",
                t["loss_diff"] <= tolerance,
            )
        )
    s = imports["seconds"]
    lines.append(
        row(
            f"`import mlfab`, wall time (optional backends imported: {imports['eager_optional'] or 'none'})",
            f"{s['mlfab']:.2f} s",
            f"`import lightning.pytorch`: {s['lightning.pytorch']:.2f} s",
            s["mlfab"] / s["lightning.pytorch"],
            "<= 1.1x",
            s["mlfab"] <= 1.1 * s["lightning.pytorch"],
        )
    )
    for key, label, fmt in (
        ("first_step_s", "seed CNN: process start to end of first optimizer step", "{:.2f} s"),
        ("peak_rss_mb", f"seed CNN: peak RSS of a {plan.start_steps}-step run", "{:.0f} MB"),
    ):
        v = start[key]
        lines.append(
            row(
                label,
                fmt.format(v["mlfab"]),
                f"Lightning: {fmt.format(v['lightning'])} (raw loop: {fmt.format(v['raw'])})",
                v["mlfab"] / v["lightning"],
                "<= 1.1x",
                v["mlfab"] <= 1.1 * v["lightning"],
            )
        )
    for workers, r in loaders.items():
        ratio = r["mlfab"] / r["dpshdl"]
        lines.append(
            row(
                f"dpshdl TensorDataset, {workers} workers: batches/s",
                f"{r['mlfab']:.0f}",
                f"dpshdl Dataloader: {r['dpshdl']:.0f}",
                ratio,
                ">= 1.0x",
                ratio >= 1.0,
            )
        )
    ms = {v: 1e3 / rate for v, rate in trained["mlp"]["steps_per_s"].items()}
    lines += [
        "",
        f"Tiny MLP, ms per step: raw {ms['raw']:.3f}, Lightning barebones {ms['bare']:.3f}, "
        f"Lightning {ms['lightning']:.3f}, mlfab {ms['mlfab']:.3f} (mlfab - raw {ms['mlfab'] - ms['raw']:+.3f}, "
        f"mlfab - Lightning barebones {ms['mlfab'] - ms['bare']:+.3f}). Steps/s are medians of "
        f"{plan.mlp_repeats} (MLP) / {plan.cnn_repeats} (CNN) alternating runs of {plan.mlp_steps} / "
        f"{plan.cnn_steps} steps, timed after {plan.mlp_warmup} / {plan.cnn_warmup} warmup steps.",
    ]
    return lines


def package(filename: str) -> str:
    if filename == "~" or filename.startswith("<"):
        return "C functions (torch ops, builtins)"
    parts = Path(filename).parts
    for name in ("mlfab", "lightning", "torchdata", "torch"):
        if name in parts:
            return name
    return "benchmark" if filename == __file__ else "other Python (stdlib, ...)"


def lightning_breakdown(stats: Any, steps: int) -> None:
    """Where Lightning's own Python time goes in the barebones run: by file, and the hook dispatchers' calls."""
    site = Path(sys.modules["lightning.pytorch"].__file__ or "").parent
    own: dict[str, float] = collections.defaultdict(float)
    for (filename, _, _), (_, _, t, _, _) in stats.stats.items():
        if Path(filename).is_relative_to(site):
            own[str(Path(filename).relative_to(site))] += t
    print("\nLightning barebones: Lightning's own time per step by file (microseconds, under cProfile)\n")
    for name, t in sorted(own.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{1e6 * t / steps:8.1f}  {name}")
    print(f"{1e6 * sum(own.values()) / steps:8.1f}  all of lightning/pytorch")
    print("\nHook dispatch per step (calls; cumulative microseconds, including the hooks themselves)\n")
    for (filename, _, fn), (_, calls, _, cum, _) in stats.stats.items():
        if filename.endswith("trainer/call.py") and fn.startswith("_call_") and calls >= steps:
            print(f"{calls / steps:6.1f}  {1e6 * cum / steps:8.1f}  {fn}")


def profile(plan: Plan) -> None:
    """cProfile of the tiny MLP in each variant: own time per step by package, where Lightning's own time goes in
    the barebones run (the floor), then mlfab's functions."""
    import cProfile
    import pstats

    steps = plan.mlp_warmup + plan.mlp_steps
    by_variant: dict[str, dict[str, float]] = {}
    kept: dict[str, pstats.Stats] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("raw", "bare", "lightning", "mlfab"):
            train(variant, "mlp", plan.mlp_warmup, plan.mlp_warmup, Path(tmp) / f"warm_{variant}")  # First uses.
            prof = cProfile.Profile()
            prof.enable()
            train(variant, "mlp", plan.mlp_steps, plan.mlp_warmup, Path(tmp) / variant)
            prof.disable()
            stats = pstats.Stats(prof)
            groups: dict[str, float] = collections.defaultdict(float)
            for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
                groups[package(filename)] += own
            by_variant[variant] = groups
            kept[variant] = stats
    names = sorted({g for groups in by_variant.values() for g in groups}, key=lambda g: -by_variant["mlfab"][g])
    print(f"Tiny MLP under cProfile ({steps} steps per run, set-up included): own time per step, microseconds\n")
    print("| package | " + " | ".join(NAMES[v] for v in by_variant) + " |")
    print("|---|" + "---:|" * len(by_variant))
    for name in [*names, "total"]:
        cells = [sum(g.values()) if name == "total" else g.get(name, 0.0) for g in by_variant.values()]
        print(f"| {name} | " + " | ".join(f"{1e6 * c / steps:.0f}" for c in cells) + " |")
    lightning_breakdown(kept["bare"], steps)
    print("\nmlfab's functions in the mlfab run, by cumulative time per step (microseconds; calls per step)\n")
    rows = [
        (cum, calls, f"{Path(f).relative_to(ROOT)}:{line}({fn})")
        for (f, line, fn), (_, calls, _, cum, _) in kept["mlfab"].stats.items()  # type: ignore[attr-defined]
        if package(f) == "mlfab" and Path(f).is_relative_to(ROOT)
    ]
    for cum, calls, where in sorted(rows, reverse=True)[:20]:
        print(f"{1e6 * cum / steps:8.1f}  {calls / steps:5.2f}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (about 1.5 minutes)")
    parser.add_argument("--profile", action="store_true", help="only profile the tiny MLP's step in each variant")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="only the tiny MLP: how low a step on Lightning goes (barebones, mlfab's dispatch "
        "savings, manual optimization)",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    quiet()
    plan = QUICK if args.quick else FULL
    if args.profile:
        profile(plan)
        return
    if args.floor:
        floor_study(Bench(plan, Guard(), lambda message: print(message, file=sys.stderr, flush=True)))
        return
    check_seed_cnn()
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:4.0f} s] {message}", file=sys.stderr, flush=True)

    # The subprocesses run first, while this process is small: a large parent makes `fork` slower.
    bench = Bench(plan, Guard(), progress)
    imports = import_times(bench)
    start = start_up(bench)
    trained = training_parity(bench)
    loaders = loader_throughput(bench)
    stall = checkpoint_stall(bench)
    progress("done")
    import mlfab

    command = "python benchmarks/parity.py" + (" --quick" if args.quick else "")
    print(
        f"`{command}`: mlfab {mlfab.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads; {time.perf_counter() - started:.0f} s; {bench.guard.summary()}\n"
    )
    print("\n".join(report(plan, trained, imports, start, loaders, stall)))


if __name__ == "__main__":
    main()
