"""The private names of Lightning and torch that mlfab uses, and its speed tricks that lean on how Lightning calls
a module, all in `mlfab/_lightning.py`: each test fails if the pinned Lightning or torch changes underneath, by
checking the name is there with the expected call shape and that the trick still works in a tiny real run."""

import inspect
import pickle
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.utilities import seed as fabric_seed
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

import mlfab
from mlfab import _lightning
from mlfab._lightning import (
    PER_STEP_HOOKS,
    CachedStateKey,
    NoProfiler,
    StepFreeCallback,
    collect_rng_states,
    file_writer,
    foreach_norm,
    lightning_validates_now,
    metric_prefix,
    metric_step_value,
    publish_metrics,
    set_rng_states,
    step_ends,
    strategy_name,
    unrepeated_sampler,
    withhold_from_loggers,
    wrap_validation_decision,
)
from mlfab.checkpoints import plain_rng_state
from mlfab.run.trainer import NEVER
from mlfab.testing import BoringConfig, BoringTask, read_scalars

pytestmark = pytest.mark.integration


def params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that writes nothing: no logger, checkpoints, progress bar or summary."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**settings, **kwargs})


def endless_trainer(max_steps: int, **kwargs: Any) -> pl.Trainer:
    """For BoringTask's endless data: validation only when something asks for it."""
    settings = {"val_check_interval": NEVER, "check_val_every_n_epoch": None, "limit_val_batches": 1}
    return quiet_trainer(max_steps=max_steps, **{**settings, **kwargs})


class FiveBatches(BoringTask):
    """40 samples, batches of 8: five batches an epoch (map-style, so epochs end)."""

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(40, self.config.in_dim, generator=gen)
        return torch.utils.data.TensorDataset(x, x.sum(-1))


def test_step_ends_at_accumulation_boundaries_and_epoch_end() -> None:
    assert params(_TrainingEpochLoop._should_accumulate) == ["self"]
    seen: list[tuple[int, int, bool, int]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append((trainer.current_epoch, args[-1], step_ends(trainer), trainer.global_step))

    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=3, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(FiveBatches(BoringConfig(max_steps=None)))
    # Batches 0-2 make a step, then 3-4 (the epoch's last batch ends a step too); twice.
    ends = [(epoch, idx) for epoch, idx, ends, _ in seen if ends]
    assert ends == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert [s for *_, s in seen] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4]  # Lightning stepped exactly there.


def test_wrap_validation_decision_adds_to_lightnings_own() -> None:
    assert params(_TrainingEpochLoop._should_check_val_fx) == ["self", "data_fetcher"]
    validated_at: list[int] = []

    class ExtraValidation(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            def decide(lightning_decision: Any, data_fetcher: Any) -> bool:
                return bool(lightning_decision(data_fetcher)) or trainer.global_step == 2

            wrap_validation_decision(trainer, decide)

        def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            validated_at.append(trainer.global_step)

    endless_trainer(6, val_check_interval=5, callbacks=[ExtraValidation()]).fit(BoringTask(BoringConfig()))
    assert validated_at == [2, 5]


def test_lightning_validates_now_is_lightnings_own_decision() -> None:
    asked: list[tuple[int, bool]] = []
    validated_at: list[int] = []

    class Ask(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            asked.append((trainer.global_step, lightning_validates_now(trainer)))

        def on_validation_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            validated_at.append(trainer.global_step)

    endless_trainer(5, val_check_interval=2, callbacks=[Ask()]).fit(BoringTask(BoringConfig()))
    assert [step for step, yes in asked if yes] == validated_at == [2, 4]
    asked.clear()
    endless_trainer(3, val_check_interval=1, limit_val_batches=0, callbacks=[Ask()]).fit(BoringTask(BoringConfig()))
    assert asked == [(1, False), (2, False), (3, False)]  # No validation at all.


def test_per_step_hooks_are_exactly_the_ones_lightning_calls_every_batch() -> None:
    calls: list[str] = []
    hooks = [name for name in vars(Callback) if name.startswith("on_") and callable(getattr(Callback, name))]

    def recorder(name: str) -> Any:
        return lambda self, *args, **kwargs: calls.append(name)

    record_all = type("RecordAll", (Callback,), {name: recorder(name) for name in hooks})
    endless_trainer(3, val_check_interval=2, callbacks=[record_all()]).fit(BoringTask(BoringConfig()))
    # The hooks of the second batch (start to end), and those of each validation batch.
    second = calls.index("on_train_batch_start", calls.index("on_train_batch_start") + 1)
    per_batch = set(calls[second : calls.index("on_train_batch_end", second) + 1])
    per_batch |= {name for name in calls if "validation_batch" in name}
    assert per_batch == set(PER_STEP_HOOKS)


def test_step_free_callback_hooks_are_none_and_skipped_by_lightning() -> None:
    ends: list[int] = []

    class OnlyBatchEnd(StepFreeCallback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            ends.append(trainer.global_step)

    assert OnlyBatchEnd.on_train_batch_end is not None
    assert all(getattr(OnlyBatchEnd, h) is None for h in PER_STEP_HOOKS if h != "on_train_batch_end")
    assert all(callable(getattr(Callback, h)) for h in PER_STEP_HOOKS)  # Still hooks of Lightning's.
    endless_trainer(4, val_check_interval=2, callbacks=[OnlyBatchEnd()]).fit(BoringTask(BoringConfig()))
    assert ends == [1, 2, 3, 4]


def test_cached_state_key_is_made_once_and_lightning_reads_it_per_hook() -> None:
    made: dict[str, int] = {"plain": 0, "cached": 0}

    class Counting(ModelCheckpoint):
        name = "plain"

        @property
        def state_key(self) -> str:
            made[self.name] += 1
            return super().state_key

    class Cached(CachedStateKey, Counting):
        name = "cached"

    plain, cached = Counting(every_n_train_steps=100), Cached(every_n_train_steps=100)
    assert cached.state_key == ModelCheckpoint.state_key.fget(cached)  # type: ignore[attr-defined]
    assert cached.state_key is cached.state_key
    endless_trainer(4, callbacks=[plain, cached], enable_checkpointing=True).fit(BoringTask(BoringConfig()))
    assert made["cached"] == 1
    assert made["plain"] > 4  # Lightning formats it at every hook: the cache saves that much.


def test_no_profiler_returns_one_context_and_trains() -> None:
    assert isinstance(NoProfiler(), PassThroughProfiler)
    assert params(PassThroughProfiler.profile) == ["self", "action_name"]
    profiler = NoProfiler()
    assert profiler.profile("a") is profiler.profile("b")
    with profiler.profile("a"):
        pass
    assert isinstance(pickle.loads(pickle.dumps(_lightning.no_profiler())), NoProfiler)  # For ddp_spawn.

    class Counting(NoProfiler):
        calls = 0

        def profile(self, action_name: str) -> Any:
            Counting.calls += 1
            return super().profile(action_name)

    trainer = endless_trainer(3, profiler=Counting())
    trainer.fit(BoringTask(BoringConfig()))
    assert trainer.global_step == 3
    assert Counting.calls > 3 * 10  # Ours, around every hook call: the ~1 us each the shared context saves.


def test_current_fx_name_skips_module_setattr(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pl.LightningModule()._current_fx_name is None  # Still an attribute of Lightning's.
    task, extra = BoringTask(BoringConfig()), torch.nn.Linear(1, 1)
    through_module: list[str] = []
    module_setattr = torch.nn.Module.__setattr__

    def counting(self: torch.nn.Module, name: str, value: Any) -> None:
        through_module.append(name)
        module_setattr(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting)
    task._current_fx_name = "training_step"
    task._num_samples, task._last_losses = 16, {"loss": torch.ones(())}  # mlfab's per-step values.
    task.extra = extra
    monkeypatch.undo()
    assert through_module == ["extra"]  # Other attributes still go through nn.Module's checks.
    assert task._current_fx_name == "training_step"
    assert task.__dict__["_current_fx_name"] == "training_step"
    assert task.__dict__["_num_samples"] == 16 and set(task.__dict__["_last_losses"]) == {"loss"}
    for registry in (task._modules, task._parameters, task._buffers):
        assert not {"_current_fx_name", "_num_samples", "_last_losses"} & set(registry)
    assert "extra" in task._modules

    seen: set[tuple[str, str | None]] = set()

    class Recording(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            seen.add((state.phase, self._current_fx_name))
            return super().get_loss(batch, state)

    endless_trainer(2, val_check_interval=2).fit(Recording(BoringConfig()))
    assert seen == {("train", "training_step"), ("valid", "validation_step")}  # Lightning sets the name we skip.


def test_step_signatures_are_precomputed_and_read_by_lightning() -> None:
    for name in _lightning.STEP_HOOKS:
        hook = getattr(mlfab.Task, name)
        assert inspect.signature(hook) is hook.__signature__
        assert params(hook) == ["self", "batch", "batch_idx"]

    # Lightning's check (on every batch) goes through inspect, which returns a `__signature__` as it is.
    class Hooks:
        def training_step(self, batch: Any, batch_idx: int) -> None: ...

    assert is_param_in_hook_signature(Hooks().training_step, "batch_idx", min_args=2)
    sig = inspect.signature(Hooks.training_step)
    Hooks.training_step.__signature__ = sig.replace(parameters=list(sig.parameters.values())[:2])  # type: ignore[attr-defined]
    assert not is_param_in_hook_signature(Hooks().training_step, "batch_idx", min_args=2)
    task = BoringTask(BoringConfig())
    assert is_param_in_hook_signature(task.training_step, "batch_idx", min_args=2)


def test_file_writer_writes_a_summary(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import Summary

    writer = SummaryWriter(str(tmp_path))
    fw = file_writer(writer)
    assert params(fw.add_summary)[:2] == ["summary", "global_step"]
    fw.add_summary(Summary(value=[Summary.Value(tag="x", simple_value=1.5)]), 7)
    writer.close()
    assert read_scalars(tmp_path) == {"x": [(7, 1.5)]}


def test_rng_states_round_trip() -> None:
    assert params(fabric_seed._collect_rng_states) == ["include_cuda"]
    assert params(fabric_seed._set_rng_states) == ["rng_state_dict"]

    def draws() -> tuple[list[float], list[float], float]:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    states = collect_rng_states(include_cuda=False)
    assert set(states) == {"torch", "numpy", "python"}
    first = draws()
    set_rng_states(states)
    assert draws() == first
    # As checkpoints store them (numpy's state as a tensor), and back.
    set_rng_states(plain_rng_state(plain_rng_state(states), inverse=True))
    assert draws() == first


def test_foreach_norm_equals_per_tensor_norms() -> None:
    tensors = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2).double(), torch.zeros(5)]
    norms = foreach_norm(tensors)
    assert len(norms) == len(tensors)
    for t, n in zip(tensors, norms, strict=True):
        assert n.dtype == t.dtype and n.shape == ()
        torch.testing.assert_close(n, torch.linalg.vector_norm(t))


def test_the_evaluation_loop_restart_stage_and_the_fit_loop_data_fetcher_exist() -> None:
    """`validate_before_next_batch` and `lightning_data_fetcher` (used to resume with the validation a checkpoint was
    written before; behaviour tested in tests/test_resume_validation.py)."""
    import inspect

    from lightning.pytorch.loops import _FitLoop
    from lightning.pytorch.loops.evaluation_loop import RestartStage, _EvaluationLoop
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert RestartStage.RESTARTED_MID_EVALUATION == "restarted_mid_evaluation"
    assert "_restart_stage" in inspect.getsource(_EvaluationLoop.restarted_mid_evaluation.fget)  # type: ignore[union-attr]
    assert "val_loop.restarted_mid_evaluation" in inspect.getsource(_TrainingEpochLoop.advance)
    assert "_data_fetcher" in inspect.getsource(_FitLoop.__init__)


def test_withhold_from_loggers_keeps_the_metrics_but_no_logger_gets_them() -> None:
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    assert params(_LoggerConnector.log_metrics) == ["self", "metrics", "step"]
    assert "for logger in self.trainer.loggers" in inspect.getsource(_LoggerConnector.log_metrics)
    received: dict[str, list[dict[str, float]]] = {"plain": [], "own": []}

    class Recording(Logger):
        version = 0

        def __init__(self, name: str) -> None:
            super().__init__()
            self._name = name

        @property
        def name(self) -> str:
            return self._name

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            received[self.name].append(dict(metrics))

    class TwoMetrics(BoringTask):
        def on_validation_start(self) -> None:  # After mlfab's own (in `setup`), which this one replaces.
            withhold_from_loggers(self.trainer, {"withheld"}, lambda logger: logger.name == "own")

        def on_validation_epoch_end(self) -> None:
            self.log("withheld", 1.0)
            self.log("passed", 2.0)

    loggers = [Recording("plain"), Recording("own")]
    trainer = endless_trainer(1, logger=loggers, limit_val_batches=1)
    (result,) = trainer.validate(TwoMetrics(BoringConfig()), verbose=False)
    assert result == {"withheld": 1.0, "passed": 2.0, "valid/loss/loss": result["valid/loss/loss"]}  # mlfab's too.
    assert {"withheld", "passed"} <= set(trainer.callback_metrics) and "withheld" in trainer.logged_metrics
    # Lightning's values, and mlfab's `valid/loss/loss`: this withholding replaced mlfab's, which withholds it.
    from_lightning = [set(m) for m in received["plain"] if "passed" in m]
    assert from_lightning == [{"passed", "epoch", "valid/loss/loss"}]
    assert not any("withheld" in m for m in received["plain"])
    assert [set(m) for m in received["own"]] == [{"valid/loss/loss"}]  # Only what mlfab writes to every logger.
    assert trainer.loggers == loggers  # Put back after the call.


def test_publish_metrics_reach_callbacks() -> None:
    seen: list[float] = []

    class Publishing(FiveBatches):
        def on_train_batch_end(self, *args: Any) -> None:
            publish_metrics(self.trainer, {"published": torch.tensor(float(self.global_step))})

    class Reader(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.append(float(trainer.callback_metrics["published"]))

    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Reader()])
    trainer.fit(Publishing(BoringConfig(max_steps=None)))
    assert seen == [5.0] and float(trainer.logged_metrics["published"]) == 5.0


def test_uploads_checkpoints_reads_the_loggers_log_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from mlfab._lightning import uploads_checkpoints

    monkeypatch.setenv("WANDB_MODE", "disabled")  # Nothing is started: the run begins at the first log.
    assert uploads_checkpoints(WandbLogger(log_model="all"))
    assert uploads_checkpoints(WandbLogger(log_model=True))
    assert not uploads_checkpoints(WandbLogger(offline=True))
    assert not uploads_checkpoints(CSVLogger("."))


def test_metric_prefix_reads_lightnings_private_prefix(tmp_path: Path) -> None:
    """`mlfab._lightning.metric_prefix`: Lightning's `_prefix` and `LOGGER_JOIN_CHAR`, as `log_metrics` uses them."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    assert metric_prefix(TensorBoardLogger(str(tmp_path), prefix="exp1")) == "exp1-"
    assert metric_prefix(TensorBoardLogger(str(tmp_path))) == ""
    assert metric_prefix(WandbLogger(save_dir=str(tmp_path), prefix="w", offline=True)) == "w-"
    assert metric_prefix(CSVLogger(str(tmp_path), prefix="c")) == "c-"
    csv = CSVLogger(str(tmp_path), name="csv", version=0, prefix="c")
    csv.log_metrics({"x": 1.0}, step=0)  # What the accessor mirrors: Lightning's own prefixing.
    csv.save()
    assert set((Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")) == {"c-x", "step"}


def test_metric_step_value_is_the_last_forward_of_a_torchmetrics_metric() -> None:
    """`mlfab._lightning.metric_step_value`: torchmetrics' private `Metric._forward_cache`, as Lightning reads it."""
    import torchmetrics

    metric = torchmetrics.MeanMetric()
    assert metric_step_value(metric) is None
    metric(torch.tensor([1.0, 3.0]))
    metric(torch.tensor([5.0]))
    assert float(metric_step_value(metric)) == 5.0 and float(metric.compute()) == 3.0  # type: ignore[arg-type]
    metric.update(torch.tensor([9.0]))
    assert float(metric_step_value(metric)) == 5.0  # type: ignore[arg-type]  # What Lightning would log too.


def test_unrepeated_sampler_splits_without_repeats_and_lightning_keeps_it() -> None:
    """`unrepeated_sampler` (mlfab's split of a map-style evaluation set under DDP; behaviour in a real 2-process run
    tested in tests/test_data_ranks.py): every index once over the ranks, and Lightning injects no sampler of its own
    over a DistributedSampler."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from torch.utils.data import DataLoader, DistributedSampler

    shares = [list(unrepeated_sampler(range(9), num_replicas=2, rank=r)) for r in (0, 1)]
    assert shares == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    assert isinstance(unrepeated_sampler(range(9), num_replicas=2, rank=0), DistributedSampler)
    source = inspect.getsource(_DataConnector._requires_distributed_sampler)
    assert "not isinstance(dataloader.sampler, DistributedSampler)" in source
    assert isinstance(DataLoader(range(9), sampler=unrepeated_sampler(range(9), 2, 1)).sampler, DistributedSampler)


def test_restricted_classmethod_is_what_lightning_decorates_load_from_checkpoint_with() -> None:
    """mlfab's `Task.load_from_checkpoint` (its checks: tests/test_checkpoint_hygiene.py) keeps Lightning's guard."""
    assert isinstance(pl.LightningModule.__dict__["load_from_checkpoint"], _lightning.restricted_classmethod)
    assert isinstance(mlfab.Task.__dict__["load_from_checkpoint"], _lightning.restricted_classmethod)


def test_next_epoch_from_here_keeps_lightning_from_counting_a_finished_epoch_twice(tmp_path: Path) -> None:
    """Lightning resumes a checkpoint written once its epoch finished into a loop that runs that epoch again, empty,
    and counts it: `next_epoch_from_here` makes it start the next epoch, and hands over the loader state (the data
    of the resume: tests/test_resume.py, ..._relaunched_with_more_epochs_... and ..._resume_exactly)."""
    from lightning.pytorch.demos.boring_classes import BoringModel
    from torchdata.stateful_dataloader import StatefulDataLoader

    class Stateful(BoringModel):
        def train_dataloader(self) -> Any:
            return StatefulDataLoader(torch.randn(8, 32), batch_size=2)  # 4 batches an epoch.

    def fit(steps: int, ckpt: Any = None) -> pl.Trainer:
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
        trainer.fit(Stateful(), ckpt_path=ckpt)
        return trainer

    fit(4).save_checkpoint(tmp_path / "epoch_done.ckpt")  # Training ended with its first epoch.
    assert fit(8, tmp_path / "epoch_done.ckpt").current_epoch == 3  # Lightning's count: one epoch too many.
    checkpoint = torch.load(tmp_path / "epoch_done.ckpt", weights_only=False)
    states = _lightning.next_epoch_from_here(checkpoint, lambda state: False)
    assert isinstance(states, list) and len(states) == 1 and "_num_yielded" in str(states[0])
    torch.save(checkpoint, tmp_path / "next_epoch.ckpt")
    assert fit(8, tmp_path / "next_epoch.ckpt").current_epoch == 2
    fit(2).save_checkpoint(tmp_path / "mid_epoch.ckpt")
    mid_epoch = torch.load(tmp_path / "mid_epoch.ckpt", weights_only=False)
    assert _lightning.next_epoch_from_here(mid_epoch, lambda state: False) is None  # Lightning's own resume.


def test_hidden_by_teardown_finds_the_error_lightnings_teardown_hid() -> None:
    """`hidden_by_teardown` (behaviour in a real run: tests/test_resume.py, a stream that fails to start) matches the
    message `CombinedLoader.__len__` raises before its iterator is made."""
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    with pytest.raises(RuntimeError) as raised:
        len(CombinedLoader([range(3)]))
    assert str(raised.value) == _lightning.UNITERATED
    try:
        try:
            raise FileNotFoundError("shard")
        except FileNotFoundError:
            len(CombinedLoader([range(3)]))
    except RuntimeError as e:
        assert isinstance(_lightning.hidden_by_teardown(e), FileNotFoundError)
    assert _lightning.hidden_by_teardown(RuntimeError("other")) is None


def rank_zeros(trainer: pl.Trainer) -> str:
    return f"rank zero's step {trainer.global_step}"


def test_spawned_result_rides_on_the_spawn_launchers_extra_results() -> None:
    """Rank zero's `get_extra_results` and the launching process's `update_main_process_results` are how Lightning's
    spawn launcher sends results back; `SpawnedResult` adds its value there and keeps the launcher's own."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    assert "self.get_extra_results(trainer)" in inspect.getsource(_MultiProcessingLauncher._collect_rank_zero_results)
    assert "self.update_main_process_results(trainer" in inspect.getsource(
        _MultiProcessingLauncher._recover_results_in_main_process
    )
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    spawned = _lightning.SpawnedResult(rank_zeros).install(trainer)
    pickle.loads(pickle.dumps(spawned.get_extra_results))  # Travels into the started processes.
    trainer.callback_metrics.update({"m": torch.tensor(1.0)})
    extra = trainer.strategy.launcher.get_extra_results(trainer)  # type: ignore[union-attr]
    assert extra[_lightning.SpawnedResult.KEY] == "rank zero's step 0" and "callback_metrics_bytes" in extra
    trainer.callback_metrics.clear()
    trainer.strategy.launcher.update_main_process_results(trainer, extra)  # type: ignore[union-attr]
    assert spawned.result == "rank zero's step 0" and float(trainer.callback_metrics["m"]) == 1.0
    plain = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert _lightning.SpawnedResult(rank_zeros).install(plain).result is None


def test_strategy_name_tells_ddp_spawn_from_ddp() -> None:
    names = {
        strategy: strategy_name(pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False).strategy)
        for strategy in ("ddp", "ddp_spawn", "ddp_fork")
    }
    assert names == {"ddp": "ddp", "ddp_spawn": "ddp_spawn", "ddp_fork": "ddp_fork"}
