"""The diagnostics mlfab logs by itself (mlfab/run/diagnostics.py): read back from a run's JSON log, switched off by
group, and computed only at the steps a logger writes."""

import io
import json
import math
import resource
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

import mlfab
from mlfab.config import build_config, check_config
from mlfab.errors import ConfigError
from mlfab.nonfinite import NonFiniteGuard, total_norm
from mlfab.run import diagnostics
from mlfab.run.diagnostics import GROUPS, Diagnostics
from mlfab.run.trainer import trainer_callbacks
from mlfab.testing import BoringConfig, BoringTask

KEYS = {  # group: the keys it logs on a CPU run with max_steps, in 32-true
    "grad_norm": {"optim/grad_norm"},
    "speed": {"speed/steps_per_second", "speed/samples_per_second", "speed/data_wait_s"},
    "time": {"time/remaining_s"},
    "memory": {"memory/cpu_peak_rss_mb"},
    "loss_scale": set(),  # 16-mixed only: test_loss_scale_under_16_mixed.
}
NAMESPACES = ("optim/", "speed/", "time/", "memory/")
ALL_KEYS = set().union(*KEYS.values()) | {"optim/loss_scale", "memory/gpu_peak_mb"}


class Recorded(BoringTask):
    """Writes every training step to JSON and records each step's gradient norm, computed by hand."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.hand_norms: list[float] = []

    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0.0))

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # After backward, before clipping.
        grads = [p.grad.double() for p in self.parameters() if p.grad is not None]
        self.hand_norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))


def train_lines(exp_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (exp_dir / "json" / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["phase"] == "train"]


def run(tmp_path: Path, task_cls: type[BoringTask] = Recorded, **config: Any) -> tuple[Any, list[dict[str, Any]]]:
    exp_dir = tmp_path / "run"
    tasks: list[Any] = []

    class Kept(task_cls):  # type: ignore[valid-type,misc]
        def on_train_start(self) -> None:
            super().on_train_start()
            tasks.append(self)

    Kept.launch(BoringConfig(**{"max_steps": 8, "exp_dir": str(exp_dir), **config}), argv=[])
    return tasks[0], train_lines(exp_dir)


def diagnostic_keys(line: dict[str, Any]) -> set[str]:
    return {k for k in line["scalars"] if k.startswith(NAMESPACES) and k != "optim/lr"}


# ---------------------------------------------------------------------------------------------------------------------
# Unit


@pytest.mark.unit
def test_the_guard_keeps_the_norm_it_computed_for_clipping_and_for_the_check() -> None:
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]  # Total 2-norm: 13.
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    loss = {"loss": torch.tensor(1.0)}
    guard = NonFiniteGuard(None)
    for max_norm, shape in ((100.0, ()), (None, (2,))):  # Clipping's total, or each gradient's norm.
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        guard.clip_and_check(params, loss, max_norm)
        norm = guard.take_grad_norm()
        assert norm is not None and tuple(norm.shape) == shape
        assert total_norm(norm) == pytest.approx(13.0)
        assert guard.take_grad_norm() is None  # Taken once.
    guard.clip_and_check(params, loss, None, check_grads=False)  # 16-mixed without clipping: nothing computed.
    assert guard.take_grad_norm() is None
    half = torch.tensor([60000.0, 60000.0], dtype=torch.float16)  # Their squares overflow fp16.
    assert total_norm(half) == pytest.approx(60000.0 * math.sqrt(2), rel=1e-3)


@pytest.mark.unit
def test_the_config_switch_defaults_to_every_group_and_refuses_unknown_ones(tmp_path: Path) -> None:
    config = BoringConfig()
    assert config.diagnostics == list(GROUPS) == ["grad_norm", "speed", "time", "memory", "loss_scale"]
    (callback,) = [c for c in trainer_callbacks(config, tmp_path) if isinstance(c, Diagnostics)]
    assert callback.groups == set(GROUPS)
    assert not any(isinstance(c, Diagnostics) for c in trainer_callbacks(BoringConfig(diagnostics=[]), tmp_path))
    with pytest.raises(ConfigError, match="diagnostics"):
        build_config(BoringConfig, {"diagnostics": ["speed", "sped"]})  # As from the command line or a YAML file.
    with pytest.raises(ConfigError, match="diagnostics"):
        check_config(BoringConfig(diagnostics=["sped"]))  # type: ignore[list-item]  # Built in Python.


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.unit
def test_speed_and_time_remaining_leave_out_validation_and_the_wait_after_a_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(diagnostics, "time", clock)
    trainer: Any = types.SimpleNamespace(
        accumulate_grad_batches=1, world_size=1, max_steps=10, global_step=0, precision_plugin=None
    )
    logged: dict[str, Any] = {}
    module: Any = types.SimpleNamespace(
        config=types.SimpleNamespace(batch_size=4),
        device=torch.device("cpu"),
        log_scalar=lambda key, value, namespace: logged.__setitem__(f"{namespace}/{key}", value),
    )
    cb = Diagnostics(["speed", "time"])

    def batch(start: float, end: float, written: bool = True) -> dict[str, float]:
        """One step's batch; its lazy values read as the task's flush would, right after, if the step is written."""
        clock.now = start
        cb.on_train_batch_start(trainer, module, None, 0)
        clock.now = end
        trainer.global_step += 1
        logged.clear()
        cb.on_train_batch_end(trainer, module, None, None, 0)
        assert all(callable(v) for v in logged.values())
        return {k: v() for k, v in logged.items()} if written else {}

    cb.on_train_start(trainer, module)  # At 0.
    first = batch(0.5, 1.0)  # Waited 0.5 (starting the loader) ...
    assert first == pytest.approx(
        {
            "speed/steps_per_second": 1.0,
            "speed/samples_per_second": 4.0,
            "speed/data_wait_s": 0.5,
            "time/remaining_s": 9 * 1.0,  # The first step's time, start-up included.
        }
    )
    batch(1.1, 2.0, written=False)  # 0.1; its values are dropped unread.
    clock.now = 2.0
    cb.on_validation_start(trainer, module)
    clock.now = 5.0
    cb.on_validation_end(trainer, module)  # 3 s off the training clock.
    batch(5.2, 6.0, written=False)  # 0.2 after the validation.
    cb.on_save_checkpoint(trainer, module, {})
    last = batch(7.0, 8.0)  # The second after the save is not a data wait.
    assert last == pytest.approx(
        {
            "speed/steps_per_second": 3 / (8.0 - 3.0 - 1.0),  # Steps 2-4 since the written step 1, off validation.
            "speed/samples_per_second": 4 * 3 / 4.0,
            "speed/data_wait_s": (0.1 + 0.2 + 0.0) / 3,
            "time/remaining_s": 6 * (8.0 - 1.0) / 3,  # Steps left times the mean step since the first one ended.
        }
    )


@pytest.mark.unit
def test_the_grad_norm_comes_from_the_guard_the_task_exposes() -> None:
    task = BoringTask(BoringConfig())
    assert isinstance(task.nonfinite_guard, NonFiniteGuard)
    assert task.nonfinite_guard is task.nonfinite_guard  # The one the task checks its steps with, not a copy.

    guard = NonFiniteGuard(None)
    trainer: Any = types.SimpleNamespace(
        accumulate_grad_batches=1, world_size=1, max_steps=10, global_step=1, precision_plugin=None
    )
    logged: dict[str, Any] = {}
    module: Any = types.SimpleNamespace(  # Any module that exposes a guard, under that name.
        nonfinite_guard=guard,
        config=types.SimpleNamespace(batch_size=4),
        device=torch.device("cpu"),
        log_scalar=lambda key, value, namespace: logged.__setitem__(f"{namespace}/{key}", value),
    )
    cb = Diagnostics(["grad_norm"])
    cb.on_train_start(trainer, module)
    guard.grad_norm = torch.tensor(2.5)  # Computed by the step's check.
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert {tag: value() for tag, value in logged.items()} == {"optim/grad_norm": 2.5}


# ---------------------------------------------------------------------------------------------------------------------
# Integration: a real run's JSON log.


@pytest.mark.integration
@pytest.mark.parametrize("clip_grad_norm", [1.0, None])  # The norm from clipping (which clips), or from the check.
def test_each_diagnostic_is_logged_at_every_written_step_with_a_plausible_value(
    tmp_path: Path, clip_grad_norm: float | None
) -> None:
    task, lines = run(tmp_path, clip_grad_norm=clip_grad_norm, valid_every_n_steps=3, batches_per_step=1)
    assert [line["step"] for line in lines] == list(range(8))
    for line in lines:
        assert diagnostic_keys(line) == set().union(*KEYS.values()), line["step"]  # No GPU, no loss scale here.
    values = {key: [line["scalars"][key] for line in lines] for key in diagnostic_keys(lines[0])}
    assert values["optim/grad_norm"] == pytest.approx(task.hand_norms, rel=1e-5)  # Each step's, before clipping.
    assert all(v > 0 for v in values["speed/steps_per_second"])
    for steps, samples in zip(values["speed/steps_per_second"], values["speed/samples_per_second"], strict=True):
        assert samples == pytest.approx(8 * steps)  # batch_size 8, one batch per step.
    assert all(0 <= v < 60 for v in values["speed/data_wait_s"])
    remaining = values["time/remaining_s"]
    assert remaining[0] > remaining[-1] == 0.0 and all(v >= 0 for v in remaining)
    peak = values["memory/cpu_peak_rss_mb"]
    assert 10 < peak[0] <= peak[-1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, Linux.


@pytest.mark.integration
def test_grad_norm_under_gradient_accumulation_is_the_steps(tmp_path: Path) -> None:
    task, lines = run(tmp_path, batches_per_step=3, max_steps=4, valid_every_n_steps=None)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert [line["scalars"]["optim/grad_norm"] for line in lines] == pytest.approx(task.hand_norms, rel=1e-5)
    for line in lines:  # Three batches of 8 per step.
        sps, samples = line["scalars"]["speed/steps_per_second"], line["scalars"]["speed/samples_per_second"]
        assert samples == pytest.approx(24 * sps)


class Tokens(Recorded):
    def get_num_samples(self, batch: Any) -> int:  # Counting tokens, say: 5 per batch of 8 here.
        return 5


@pytest.mark.integration
def test_samples_per_second_counts_what_num_samples_counts(tmp_path: Path) -> None:
    """It counted `batch_size` per batch (8 here), while `num_samples` counts `get_num_samples` (5)."""
    _, lines = run(tmp_path, task_cls=Tokens, max_steps=4, valid_every_n_steps=None)
    for line in lines:
        sps, samples = line["scalars"]["speed/steps_per_second"], line["scalars"]["speed/samples_per_second"]
        assert samples == pytest.approx(5 * sps)


@pytest.mark.integration
def test_a_group_switched_off_is_not_logged(tmp_path: Path) -> None:
    for i, off in enumerate(GROUPS):
        kept = [g for g in GROUPS if g != off]
        _, lines = run(tmp_path / str(i), diagnostics=kept, max_steps=3, valid_every_n_steps=None)
        for line in lines:
            assert diagnostic_keys(line) == set().union(*(KEYS[g] for g in kept)), off
    _, lines = run(tmp_path / "none", diagnostics=[], max_steps=3, valid_every_n_steps=None)
    assert lines and all(not diagnostic_keys(line) for line in lines)
    assert all("optim/lr" in line["scalars"] for line in lines)  # The task's own, not a diagnostic.


@pytest.mark.integration
def test_diagnostics_are_computed_only_at_the_steps_a_logger_writes(tmp_path: Path) -> None:
    calls: dict[str, list[int]] = {}
    eager: list[str] = []

    def counted(tag: str, step: int, value: Any) -> Any:
        def call() -> Any:
            calls.setdefault(tag, []).append(step)
            return value()

        return call

    class Counting(BoringTask):
        def set_loggers(self) -> None:  # Writes its first line, then the last step only.
            self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=1e6))

        def log_scalar(self, key: str, value: Any, *, namespace: str | None = None) -> None:
            tag = f"{namespace}/{key}"
            if tag in ALL_KEYS:
                if not callable(value):
                    eager.append(tag)
                else:
                    value = counted(tag, self.global_step - 1, value)
            super().log_scalar(key, value, namespace=namespace)

    _, lines = run(tmp_path, Counting, max_steps=30, valid_every_n_steps=None)
    assert [line["step"] for line in lines] == [0, 29]
    assert not eager  # Every diagnostic is handed over as a callable ...
    assert calls == {key: [0, 29] for key in set().union(*KEYS.values())}  # ... run once per written step only.
    assert diagnostic_keys(lines[1]) == set(calls)


@pytest.mark.integration
def test_loss_scale_under_16_mixed(tmp_path: Path) -> None:
    scales: list[float] = []

    class Scaled(BoringTask):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            scales.append(self.trainer.precision_plugin.scaler.get_scale())  # type: ignore[attr-defined]
            super().on_train_batch_end(outputs, batch, batch_idx)  # Writes the step's logs.

    trainer = pl.Trainer(
        max_steps=4,
        logger=mlfab.JsonLogger(tmp_path, log_interval_seconds=0.0),
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu")],  # Lightning makes the `precision` flag bf16 on a CPU.
        gradient_clip_val=1e6,
        callbacks=[Diagnostics()],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Scaled(BoringConfig()))
    lines = train_lines(tmp_path)
    assert [line["scalars"]["optim/loss_scale"] for line in lines] == scales
    assert all(0 < s <= 2.0**16 and math.log2(s).is_integer() for s in scales)  # GradScaler's powers of two.
    assert all("optim/grad_norm" in line["scalars"] for line in lines)  # Clipping computes it under 16-mixed.


@pytest.mark.integration
def test_the_overhead_benchmark_reports_both_timings_and_the_hooks_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib
    import logging
    import re
    import sys

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab"):  # The script quiets them.
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["diagnostics_overhead.py", "--steps", "5", "--repeats", "1"])
    fresh = [name for name in ("diagnostics_overhead", "parity") if name not in sys.modules]
    try:
        benchmark = importlib.import_module("diagnostics_overhead")
        capsys.readouterr()
        benchmark.main()
        out = capsys.readouterr().out
    finally:
        for name in fresh:  # As tests/test_benchmarks.py imports them: from a clean slate.
            sys.modules.pop(name, None)

    def number(pattern: str) -> float:
        match = re.search(pattern, out, flags=re.M)
        assert match, f"no line matching {pattern!r} in:\n{out}"
        return float(match.group(1))

    off, on = (
        number(r"^diagnostics off: +([\d.]+) ms/step$"),
        number(r"^diagnostics on \(default\): +([\d.]+) ms/step$"),
    )
    assert off > 0 and on > 0
    assert number(r"^difference: +([-+\d.]+) ms/step$") == pytest.approx(on - off, abs=0.0015)
    assert number(r"^ratio on / off: +([\d.]+)$") == pytest.approx(on / off, rel=0.01, abs=0.002)
    hooks = number(r"^diagnostics hooks alone: +([\d.]+) us/step \(median step; mean step [\d.]+ us\)$")
    assert 0 < hooks < on * 1e3  # Part of a step.


@pytest.mark.unit
def test_the_terminal_line_leaves_out_speed_time_and_memory() -> None:
    from mlfab.logs.values import Logs

    scalars = {"loss/loss": 1.5, "optim/grad_norm": 2.0, "speed/steps_per_second": 9.0, "time/remaining_s": 3.0,
               "memory/cpu_peak_rss_mb": 100.0}  # fmt: skip
    line = mlfab.StdoutLogger().format(Logs("train", 3, 10, 1.0, 24, {"scalar": scalars}))
    assert line == "[train] step 3/10 | loss/loss=1.5 | optim/grad_norm=2"


@pytest.mark.unit
def test_the_terminal_line_shows_a_tasks_own_values_in_the_speed_time_and_memory_namespaces() -> None:
    from mlfab.logs.values import Logs

    own = {"speed/tokens_per_second": 5.0, "time/data_s": 2.0, "memory/cache_mb": 7.0}
    scalars = {**own, **{tag: 1.0 for tag in diagnostics.TERMINAL_HIDDEN_TAGS}}
    logs = Logs("train", 3, 10, 1.0, 24, {"scalar": scalars})
    line = mlfab.StdoutLogger().format(logs)
    assert line == "[train] step 3/10 | memory/cache_mb=7 | speed/tokens_per_second=5 | time/data_s=2"

    class ShowsEverything(mlfab.StdoutLogger):  # The way to see mlfab's own on the terminal too.
        hidden_tags = frozenset()

    shown = ShowsEverything().format(logs).split(" | ")[1:]
    assert [part.split("=")[0] for part in shown] == sorted(scalars)


class OwnTimeValues(Recorded):
    """Logs values of its own in the namespaces of mlfab's speed, time and memory diagnostics."""

    def set_loggers(self) -> None:
        super().set_loggers()
        self.add_logger(mlfab.StdoutLogger(log_interval_seconds=0.0, stream=self.terminal, tty=False))

    def log_train_step(self, batch: Any, output: Any, state: mlfab.State) -> None:
        self.log_scalar("x", 1, namespace="time")
        self.log_scalar("tokens", 2, namespace="speed")
        self.log_scalar("cache_mb", 3, namespace="memory")


@pytest.mark.integration
def test_a_run_shows_the_tasks_own_values_and_hides_exactly_the_diagnostics_on_the_terminal(tmp_path: Path) -> None:
    terminal = io.StringIO()
    OwnTimeValues.terminal = terminal  # type: ignore[attr-defined]
    _, lines = run(tmp_path, OwnTimeValues, max_steps=3)

    own = {"time/x", "speed/tokens", "memory/cache_mb"}
    logged = set().union(*(line["scalars"] for line in lines))
    diagnostic = {tag for tag in logged if tag.startswith(("speed/", "time/", "memory/"))} - own
    assert diagnostic == KEYS["speed"] | KEYS["time"] | KEYS["memory"]  # What the JSON log got from Diagnostics ...
    assert diagnostic <= diagnostics.TERMINAL_HIDDEN_TAGS  # ... is what the terminal leaves out.

    train = [line for line in terminal.getvalue().splitlines() if line.startswith("[train]")]
    assert len(train) == 3
    for line in train:
        shown = dict(part.split("=", 1) for part in line.split(" | ") if "=" in part)
        assert {tag: shown.get(tag) for tag in own} == {"time/x": "1", "speed/tokens": "2", "memory/cache_mb": "3"}
        assert not diagnostic.intersection(shown)


@pytest.mark.integration
def test_a_parameter_group_with_a_rate_of_its_own_is_logged_too(tmp_path: Path) -> None:
    """`optim/lr` was the first group's rate alone: a second network's rate was never shown."""

    class TwoRates(Recorded):
        def build_optimizer(self) -> torch.optim.Optimizer:
            weight, bias = self.layer.weight, self.layer.bias
            return torch.optim.SGD([{"params": [weight], "lr": 0.05}, {"params": [bias], "lr": 0.01}])

    _, lines = run(tmp_path, TwoRates, max_steps=3)
    assert [(line["scalars"]["optim/lr"], line["scalars"]["optim/lr_pg1"]) for line in lines] == [(0.05, 0.01)] * 3
