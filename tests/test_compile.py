"""The `compile` key: torch.compile of the task's forward, interchangeable checkpoints, exact resume either way,
its cost printed and logged, and a task that compile cannot reach refused at its first step."""

import importlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

import mlfab
from mlfab.config import check_config
from mlfab.testing import BoringConfig, BoringTask, read_scalars

LOSSES: dict[int, float] = {}


class Recorded(BoringTask):
    """Records every training step's loss (the step it was computed at)."""

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        loss = super().get_loss(batch, state)
        if state.phase == "train":
            LOSSES[state.num_steps] = loss.item()
        return loss


def train(exp_dir: Path, compile: Any, max_steps: int = 8) -> dict[int, float]:  # noqa: A002
    LOSSES.clear()
    config = BoringConfig(
        exp_dir=str(exp_dir),
        compile=compile,
        max_steps=max_steps,
        save_every_n_steps=4,
        keep_last_n_checkpoints=5,
        valid_every_n_steps=None,
    )
    Recorded.launch(config, argv=[])
    return dict(LOSSES)


def weights(path: Path) -> dict[str, Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def resume_from_step_4(run: Path, copy: Path, compile: Any) -> dict[int, float]:  # noqa: A002
    """The run's directory as it was when its step-4 checkpoint was the newest, resumed."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("*.ckpt"):
        if "4" not in ckpt.stem:
            ckpt.unlink()
    return train(copy, compile)


@pytest.mark.unit
def test_compile_options_are_checked() -> None:
    check_config(BoringConfig(compile={"mode": "max-autotune", "fullgraph": False, "dynamic": None}))
    with pytest.raises(mlfab.ConfigError) as e:
        check_config(BoringConfig(compile={"mode": "fastest", "fulgraph": True}))
    assert "key 'compile': must be true, false, or a mapping of mode, fullgraph, dynamic, backend" in str(e.value)
    assert "max-autotune" in str(e.value)
    with pytest.raises(mlfab.ConfigError, match=r"\(mode or options, not both\)"):
        check_config(BoringConfig(compile={"mode": "default", "options": {"trace.enabled": False}}))


@pytest.mark.slow
def test_compiled_and_eager_runs_agree_and_resume_from_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eager = train(tmp_path / "eager", False)
    capsys.readouterr()
    compiled = train(tmp_path / "compiled", {"mode": "default"})
    out = capsys.readouterr().out
    assert sorted(eager) == sorted(compiled) == list(range(8))
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)

    # What compiling cost: printed once after the first step, logged at every step.
    assert out.count("torch.compile (mode='default'): ") == 1
    assert "[train] step 7/8" in out and "time/compile_s=" not in out  # Printed once, not on every line.
    scalars = read_scalars(tmp_path / "compiled" / "tensorboard" / "train")
    logged = scalars["time/compile_s"]
    assert [step for step, _ in logged] == [step for step, _ in scalars["loss/loss"]]  # Every step written.
    assert logged[0][1] > 0

    # The same checkpoint keys and shapes: one loads into the other's task either way.
    for run in ("eager", "compiled"):
        assert sorted(ckpt.name for ckpt in (tmp_path / run / "checkpoints").glob("*.ckpt")) == [
            "last.ckpt",
            "step_00000004.ckpt",
            "step_00000008.ckpt",
        ]
    a, b = (
        weights(tmp_path / "eager" / "checkpoints" / "last.ckpt"),
        weights(tmp_path / "compiled" / "checkpoints" / "last.ckpt"),
    )
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    # Exact resume from step 4, each run's checkpoint resumed compiled and eager.
    assert resume_from_step_4(tmp_path / "compiled", tmp_path / "c2c", True) == {s: compiled[s] for s in range(4, 8)}
    assert resume_from_step_4(tmp_path / "compiled", tmp_path / "c2e", False) == pytest.approx(
        {s: compiled[s] for s in range(4, 8)}, rel=1e-5, abs=1e-6
    )
    assert resume_from_step_4(tmp_path / "eager", tmp_path / "e2c", True) == pytest.approx(
        {s: eager[s] for s in range(4, 8)}, rel=1e-5, abs=1e-6
    )


class NotCalled(BoringTask):
    """Calls its layer directly, never `self(x)`: there is nothing for compile to compile."""

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x).squeeze(-1), y)


@pytest.mark.integration
def test_compile_that_reaches_nothing_stops_at_the_first_step(tmp_path: Path) -> None:
    with pytest.raises(mlfab.ConfigError) as e:
        NotCalled.launch(BoringConfig(exp_dir=str(tmp_path / "run"), compile=True), argv=[])
    assert "compile: NotCalled was never called as self(...) in its first training step" in str(e.value)
    assert "set compile=false" in str(e.value)
    assert (tmp_path / "run" / "config.yaml").is_file()  # The run's record stays.


@pytest.mark.integration
@pytest.mark.parametrize(("subcommand", "first"), [("validate", "valid batch"), ("predict", "predict batch")])
def test_compile_that_reaches_nothing_stops_an_evaluation_at_its_first_batch(
    subcommand: str, first: str, tmp_path: Path
) -> None:
    """Only the first training step checked: `validate --model.config.compile=true` compiled nothing, silently."""

    class NotCalledAnywhere(NotCalled):
        def get_prediction(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            return self.layer(batch[0])

    run = tmp_path / "run"
    NotCalledAnywhere.launch(BoringConfig(exp_dir=str(run), max_steps=2), argv=[])
    with pytest.raises(mlfab.ConfigError) as e:
        NotCalledAnywhere.launch(BoringConfig(exp_dir=str(run)), argv=[subcommand, "--model.config.compile=true"])
    assert f"compile: NotCalledAnywhere was never called as self(...) in its first {first}" in str(e.value)


@pytest.mark.slow
def test_the_parity_benchmarks_compiled_variants_compile_and_train_like_the_raw_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from mlfab._lightning import compile_seconds

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    parity = importlib.import_module("parity")
    monkeypatch.delitem(sys.modules, "parity")
    quieted = ("lightning", "lightning.pytorch", "lightning.fabric", "mlfab")
    levels = {name: logging.getLogger(name).level for name in quieted}
    request.addfinalizer(lambda: [logging.getLogger(n).setLevel(level) for n, level in levels.items()])  # Quieted.
    losses, compiled = {}, {}
    for variant in ("raw", "raw_compiled", "mlfab_compiled"):
        before = compile_seconds()
        losses[variant] = parity.train(variant, "cnn", 4, 2, tmp_path / variant).losses
        compiled[variant] = compile_seconds() > before  # (Loading a graph from torch's on-disk cache counts too.)
    # Each compiled arm compiled: `net.compile()` on the raw loop's nn.Sequential compiled nothing and ran eagerly.
    assert compiled == {"raw": False, "raw_compiled": True, "mlfab_compiled": True}
    for variant, curve in losses.items():
        assert curve == pytest.approx(losses["raw"], abs=parity.COMPILED_LOSS_TOLERANCE), variant
    assert losses["raw"][-1] < losses["raw"][0]


@pytest.mark.slow
def test_compile_through_the_fit_subcommand_and_a_users_own_trainer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlfab.cli.parser import run_cli

    args = ["fit", "--model.config.compile", "{mode: default}", "--model.config.max_steps", "3"]
    assert run_cli(Recorded, [*args, f"--model.config.exp_dir={tmp_path / 'cli'}"]) == 0
    assert "torch.compile (mode='default'): " in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["model"]["config"]["compile"] == {
        "mode": "default"
    }

    task = Recorded(BoringConfig(compile=True, exp_dir=str(tmp_path / "own")))
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(task)
    assert "torch.compile (torch's defaults): " in capsys.readouterr().out
    assert task._compiled_call_impl is not None  # nn.Module.compile's: the task's calls run compiled.
    assert sorted(task.state_dict()) == ["layer.bias", "layer.weight"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("value", "says"), [({"backend": "nonexistent"}, "nonexistent"), ({"options": {"bogus_opt": 1}}, "bogus_opt")]
)
def test_a_backend_or_option_torch_does_not_know_is_a_config_error(tmp_path: Path, value: dict, says: str) -> None:
    """It crashed with torch's traceback (exit 1), after the run directory was made."""
    with pytest.raises(mlfab.ConfigError) as e:
        BoringTask.launch(BoringConfig(exp_dir=str(tmp_path / "run"), compile=value), argv=[])
    assert str(e.value).startswith(f"compile: torch.compile refused {value}: ") and says in str(e.value)
    assert not (tmp_path / "run").exists()  # Refused before the run started.


@pytest.mark.integration
def test_reduce_overhead_off_cuda_is_a_config_error(tmp_path: Path) -> None:
    """Its CUDA graphs are skipped on CPU (a debug log of torch's): the run was compiled as mode default, silently."""
    with pytest.raises(mlfab.ConfigError) as e:
        BoringTask.launch(BoringConfig(exp_dir=str(tmp_path / "run"), compile={"mode": "reduce-overhead"}), argv=[])
    assert str(e.value) == (
        "compile: mode reduce-overhead captures CUDA graphs, and this run is on cpu, where torch skips them and "
        "compiles as mode default does. Set compile='{mode: default}' (or true), or run on a CUDA device."
    )
    assert not (tmp_path / "run").exists()
