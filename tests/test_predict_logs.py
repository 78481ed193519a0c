"""What a task logs during predict (`log_*` in `get_prediction`) is written as phase "predict", once at the end of
the predict run, at the step of the weights: never mixed into validation. Read back from the JSON log, Lightning's
CSVLogger, TensorBoard and the terminal, in a plain Trainer, through the `predict` subcommand, and under DDP."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import Dataset

import mlfab
from mlfab.testing import BoringConfig, BoringTask, read_scalars

BATCH = 8
NUM_PREDICT = 21  # 8 + 8 + 5: a partial last batch, so a mean of batch means would be wrong.


class Samples(Dataset):
    def __len__(self) -> int:
        return NUM_PREDICT

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.float32]:
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return x, np.float32(x.sum())


class Predicts(BoringTask):
    """Logs a scalar and a string from `get_prediction`."""

    def get_dataset(self, phase: mlfab.Phase) -> Samples:
        return Samples()

    def get_prediction(self, batch: Any) -> Tensor:
        output = super().get_prediction(batch)
        self.log_scalar("mean_output", lambda: output.mean())
        self.log_string("batch", f"{len(output)} samples")
        return output


def config(**kwargs: Any) -> BoringConfig:
    return BoringConfig(**{"batch_size": BATCH, "max_steps": 4, "valid_every_n_steps": 2, **kwargs})


def json_lines(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_dir / "json" / "log.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_predict_logs_are_written_as_phase_predict_and_not_into_the_next_validation(tmp_path: Path) -> None:
    task = Predicts(config())
    csv_logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=[mlfab.JsonLogger(tmp_path / "run"), csv_logger],
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task)
    loader = torch.utils.data.DataLoader(Samples(), batch_size=BATCH)
    outputs = trainer.predict(task, dataloaders=loader)
    trainer.validate(task, dataloaders=loader, verbose=False)

    expected = float(torch.cat(outputs).mean())  # type: ignore[arg-type]  # Over all 21 samples.
    batch_means = [float(o.mean()) for o in outputs]  # type: ignore[union-attr]
    assert abs(np.mean(batch_means) - expected) > 1e-4  # A mean of batch means would be measurably wrong.

    lines = json_lines(tmp_path / "run")
    (predict,) = [line for line in lines if line["phase"] == "predict"]
    assert predict["step"] == 4  # The step of the weights.
    assert predict["scalars"] == {"value/mean_output": pytest.approx(expected, rel=1e-6)}
    assert predict["strings"] == {"value/batch": "8 samples"}  # The first batch's, as in validation.
    valid = [line for line in lines if line["phase"] == "valid"]
    assert len(valid) == 3  # At steps 2 and 4, then `validate`; none has what predict logged.
    assert not any("value/mean_output" in line["scalars"] or "value/batch" in line["strings"] for line in valid)

    # A Lightning logger gets it under the phase's prefix, as the other phases.
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("predict/value/mean_output")]
    assert [(int(row["step"]), float(row["predict/value/mean_output"])) for row in rows] == [
        (4, pytest.approx(expected, rel=1e-6))
    ]


class PredictsToFiles(Predicts):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.StdoutLogger(), mlfab.TensorboardLogger(self.exp_dir))


@pytest.mark.integration
def test_the_predict_subcommand_writes_its_logs_to_the_runs_loggers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = ["fit", f"--model.config.run_dir={tmp_path / 'runs'}", f"--model.config.batch_size={BATCH}"]
    PredictsToFiles.launch(argv=[*fit, "--model.config.max_steps=3", "--model.config.valid_every_n_steps=2"])
    (exp,) = (tmp_path / "runs" / "predicts_to_files").iterdir()
    capsys.readouterr()
    PredictsToFiles.launch(argv=["predict", f"--ckpt_path={exp / 'checkpoints' / 'last.ckpt'}"])
    terminal = capsys.readouterr().out

    saved = torch.load(exp / "predictions" / "step_00000003.pt", weights_only=False)
    expected = float(torch.cat(saved["predictions"]).mean())
    written = read_scalars(exp / "tensorboard" / "predict")["value/mean_output"]
    assert written == [(3, pytest.approx(expected, rel=1e-6))]
    assert "value/mean_output" not in read_scalars(exp / "tensorboard" / "valid")
    (line,) = [line for line in terminal.splitlines() if line.startswith("[predict]")]
    match = re.fullmatch(r"\[predict\] step 3/3 \| value/mean_output=(\S+) \| value/batch='8 samples'", line)
    assert match is not None, line
    assert float(match[1]) == pytest.approx(expected, rel=1e-3)


SCRIPT = """
import sys
import numpy as np
import torch
import mlfab
from mlfab.testing import BoringConfig, BoringTask


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 21

    def __getitem__(self, i):
        x = np.random.default_rng(i).normal(size=4).astype(np.float32)
        return x, np.float32(x.sum())


class Predicts(BoringTask):
    def get_dataset(self, phase):
        return Samples()

    def set_loggers(self):
        self.add_logger(mlfab.JsonLogger(self.exp_dir))

    def get_prediction(self, batch):
        output = super().get_prediction(batch)
        self.log_scalar("mean_output", lambda: output.mean())
        self.log_scalar(f"rank_{self.global_rank}_only", float(self.global_rank + 1))  # Not paired with another.
        return output


if __name__ == "__main__":
    Predicts.launch(BoringConfig(batch_size=4), argv=sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_ddp_a_predict_scalar_is_the_mean_over_every_ranks_samples(tmp_path: Path) -> None:
    script = tmp_path / "predicting_task.py"
    script.write_text(SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]), MASTER_PORT=str(free_port()))
    args = ["predict", "--model.config.accelerator=cpu", "--model.config.devices=2"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, f"--model.config.run_dir={tmp_path / 'runs'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (exp,) = (tmp_path / "runs" / "predicts").iterdir()
    per_rank = [torch.cat(torch.load(exp / "predictions" / f"step_00000000.rank{r}.pt")["predictions"]) for r in (0, 1)]
    assert float(per_rank[0].mean()) != pytest.approx(float(per_rank[1].mean()), rel=1e-3)  # Ranks' data differ.
    (predict,) = [line for line in json_lines(exp) if line["phase"] == "predict"]
    assert predict["step"] == 0
    assert predict["scalars"]["value/mean_output"] == pytest.approx(float(torch.cat(per_rank).mean()), rel=1e-6)
    assert (predict["scalars"]["value/rank_0_only"], predict["scalars"].get("value/rank_1_only")) == (1.0, 2.0)


class ListPredictions(BoringTask):
    """20 samples in batches of 8, 8 and 4; each batch's prediction a list of floats (`.tolist()`, decoded text)."""

    def get_dataset(self, phase: mlfab.Phase) -> Any:
        x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.TensorDataset(x, x.sum(-1))

    def get_prediction(self, batch: Any) -> Any:
        return self(batch[0]).tolist()


@pytest.mark.integration
def test_predictions_that_are_lists_are_saved_for_every_batch(tmp_path: Path) -> None:
    """The file held only the first batch's list (read as Lightning's per-dataloader nesting)."""
    exp = tmp_path / "run"
    ListPredictions.launch(BoringConfig(max_steps=2, batch_size=8, valid_batches=0, exp_dir=str(exp)), argv=[])
    ListPredictions.launch(argv=["predict", "--ckpt_path", str(exp / "checkpoints" / "last.ckpt")])
    (path,) = (exp / "predictions").glob("*.pt")
    saved = torch.load(path, weights_only=True)
    assert [len(batch) for batch in saved["predictions"]] == [8, 8, 4]
    assert saved["batch_indices"] == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16, 17, 18, 19]]
