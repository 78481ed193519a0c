"""`log_*` calls in `on_validation_end` / `on_test_end` (the task's override, after super(), or a callback's) are
written with the evaluation they were made in: Lightning calls those hooks after `on_validation_epoch_end`, where the
evaluation was written, so their values went into the next validation (at its step, averaged into its mean), the last
validation's and every test's were never written."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

CB, TASK, TEST = "value/cb_on_validation_end", "value/task_on_validation_end", "value/task_on_test_end"


class LogsAtEnd(pl.Callback):
    """Logs the step of the weights it sees as the evaluation ends; fails there at validation `fail_at`, if given."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.validations = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.log_scalar("cb_on_validation_end", float(pl_module.weights_step))
        self.validations += 1
        if self.validations == self.fail_at:
            raise RuntimeError("on_validation_end failed")

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.log_scalar("cb_on_test_end", float(pl_module.weights_step))


class EndLogging(BoringTask):
    fail_at: int | None = None
    lazy_calls = 0

    def set_loggers(self) -> None:
        json_logger = mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0)
        self.add_logger(json_logger, mlfab.TensorboardLogger(self.exp_dir), mlfab.StdoutLogger())

    def configure_callbacks(self) -> list[pl.Callback]:
        return [*super().configure_callbacks(), LogsAtEnd(self.fail_at)]

    def log_valid_step(self, batch: Any, output: Any, state: mlfab.State) -> None:
        self.log_scalar("lazy", self._lazy)

    def _lazy(self) -> float:
        type(self).lazy_calls += 1
        return 1.0

    def on_validation_end(self) -> None:
        super().on_validation_end()
        self.log_scalar("task_on_validation_end", float(self.weights_step))
        self.log_string("text_on_validation_end", f"step {self.weights_step}")

    def on_test_end(self) -> None:
        super().on_test_end()
        self.log_scalar("task_on_test_end", float(self.weights_step))


def json_lines(exp_dir: Path, phase: str) -> list[dict[str, Any]]:
    lines = map(json.loads, (exp_dir / "json" / "log.jsonl").read_text().splitlines())
    return [line for line in lines if line["phase"] == phase]


def config(tmp_path: Path, **kwargs: Any) -> BoringConfig:
    return BoringConfig(max_steps=4, valid_every_n_steps=2, valid_batches=2, run_dir=str(tmp_path), **kwargs)


@pytest.mark.integration
def test_values_logged_in_on_validation_end_are_written_with_that_validation_in_fit_validate_and_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    EndLogging.lazy_calls = 0
    EndLogging.launch(config(tmp_path), argv=[])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[valid]")]
    assert [line.split(" | ")[0] for line in lines] == ["[valid] step 1/4", "[valid] step 2/4", "[valid] step 4/4"]
    assert all(
        f"{CB}={step} " in line and f"{TASK}={step} " in line for step, line in zip((1, 2, 4), lines, strict=True)
    )
    (run,) = (tmp_path / "end_logging").iterdir()
    valid = json_lines(run, "valid")
    assert [line["step"] for line in valid] == [1, 2, 4]  # One write per validation: nothing came twice.
    for line in valid:
        step = line["step"]
        assert line["scalars"][CB] == line["scalars"][TASK] == step  # Its own, not the one before (nor their mean).
        assert line["strings"]["value/text_on_validation_end"] == f"step {step}"
        assert "loss/loss" in line["scalars"]
    assert EndLogging.lazy_calls == 2 * 3  # Each batch's lazy value computed once, though written after the hook.
    tensorboard = read_scalars(run / "tensorboard" / "valid")
    assert tensorboard[CB] == tensorboard[TASK] == [(1, 1.0), (2, 2.0), (4, 4.0)]

    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"  # Evaluated into the run, at the weights' step.
    EndLogging.launch(argv=["test", ckpt])
    (line,) = json_lines(run, "test")
    assert (line["step"], line["scalars"][TEST], line["scalars"]["value/cb_on_test_end"]) == (4, 4.0, 4.0)
    EndLogging.launch(argv=["validate", ckpt])
    *_, line = json_lines(run, "valid")
    assert (line["step"], line["scalars"][CB], line["scalars"][TASK]) == (4, 4.0, 4.0)
    assert len(json_lines(run, "valid")) == 4


@pytest.mark.integration
def test_values_logged_in_evaluation_end_hooks_reach_lightnings_metrics_and_the_sanity_checks_are_not_written(
    tmp_path: Path,
) -> None:
    task = EndLogging(config(tmp_path))
    logger = mlfab.JsonLogger(tmp_path, log_interval_seconds=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task)
    valid = json_lines(tmp_path, "valid")
    assert [(line["step"], line["scalars"][CB]) for line in valid] == [(2, 2.0), (4, 4.0)]  # No sanity check's.
    assert float(trainer.callback_metrics[f"valid/{CB}"]) == 4.0
    trainer.test(task)
    assert float(trainer.callback_metrics[f"test/{TEST}"]) == 4.0
    assert json_lines(tmp_path, "test")[-1]["scalars"][TEST] == 4.0


@pytest.mark.integration
def test_a_validation_whose_on_validation_end_fails_is_written(tmp_path: Path) -> None:
    """It was written before that hook ran; now it is written after, also when the hook ends training."""

    class FailsAtSecond(EndLogging):
        fail_at = 2

    with pytest.raises(RuntimeError, match="on_validation_end failed"):
        FailsAtSecond.launch(config(tmp_path), argv=[])
    (run,) = (tmp_path / "fails_at_second").iterdir()
    valid = json_lines(run, "valid")
    assert [(line["step"], line["scalars"][CB]) for line in valid] == [(1, 1.0), (2, 2.0)]
    assert "loss/loss" in valid[-1]["scalars"]


DDP_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import mlfab
from mlfab.testing import BoringConfig, BoringTask

class LogsRank(pl.Callback):
    def on_validation_end(self, trainer, pl_module):
        pl_module.log_scalar("rank", float(trainer.global_rank))
        if trainer.is_global_zero:
            pl_module.log_scalar("rank_zero_only", 1.0)
        else:
            pl_module.log_scalar("rank_one_only", 2.0)

class Ranks(BoringTask):
    def set_loggers(self):
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0))

    def configure_callbacks(self):
        return [*super().configure_callbacks(), LogsRank()]

    def log_valid_step(self, batch, output, state):  # A score of the classes in this rank's batches, say.
        self.log_scalar(f"class_{self.global_rank}", 10.0 * (self.global_rank + 1))
        if self.global_rank == 1:  # Lightning's own, unsynchronised: each rank keeps its own (it hung the run).
            self.log("lightning_rank_one_only", 5.0)

    def on_train_end(self):
        with open(f"{os.environ['OUT_DIR']}/metric_rank{self.global_rank}.json", "w") as f:
            json.dump(float(self.trainer.callback_metrics["valid/value/rank"]), f)

if __name__ == "__main__":
    Ranks.launch(BoringConfig(max_steps=2, valid_every_n_steps=2, valid_batches=1), argv=sys.argv[1:])
"""


@pytest.mark.slow
def test_under_ddp_a_value_only_some_ranks_log_is_their_mean_also_in_on_validation_end(
    tmp_path: Path,
) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(DDP_SCRIPT)
    (tmp_path / "out").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OUT_DIR": str(tmp_path / "out")}
    args = ["accelerator=cpu", "devices=2", f"run_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=env | {"MASTER_PORT": str(port)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # (Without the fix, the rank-zero-only value hung the next validation's synchronisation.)
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "runs" / "ranks").iterdir()
    keys = ["value/rank", "value/rank_zero_only", "value/rank_one_only", "value/class_0", "value/class_1"]
    written = [(line["step"], *(line["scalars"].get(key) for key in keys)) for line in json_lines(run, "valid")]
    assert written == [(1, 0.5, 1.0, 2.0, 10.0, 20.0), (2, 0.5, 1.0, 2.0, 10.0, 20.0)]
    assert [json.loads((tmp_path / "out" / f"metric_rank{r}.json").read_text()) for r in (0, 1)] == [0.5, 0.5]
