"""Tasks written the way mlfab 0.2 users write them (#14): its hooks are called at the same points, its optimizer
API works, `set_training_over`, `get_batch_size`, per-sample losses, `use_cli`, the `State` helpers and
`field(default)` without help."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.integration


class Json(BoringTask):
    def set_loggers(self) -> None:
        self.add_logger(mlfab.JsonLogger(self.exp_dir, log_interval_seconds=0.0))


def train_lines(exp: Path, key: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (exp / "json" / "log.jsonl").read_text().splitlines()]
    return [(x["step"], x["scalars"][key]) for x in lines if x["phase"] == "train" and key in x.get("scalars", {})]


def run(task_cls: type[BoringTask], tmp_path: Path, **config: Any) -> Path:
    settings = {"max_steps": 4, "valid_every_n_steps": None, "exp_dir": str(tmp_path / "run"), **config}
    task_cls.launch(BoringConfig(**settings), use_cli=False)
    return tmp_path / "run"


def test_hooks_are_called_where_mlfab_0_2_called_them(tmp_path: Path) -> None:
    calls: list[tuple[Any, ...]] = []

    class Hooks(Json):
        def on_training_start(self, state: mlfab.State) -> None:
            calls.append(("training_start", state.num_steps))

        def on_step_start(self, state: mlfab.State) -> None:
            calls.append(("step_start", state.num_steps))

        def on_step_end(self, state: mlfab.State, loss_dict: dict[str, Tensor]) -> None:
            calls.append(("step_end", state.num_steps, sorted(loss_dict), loss_dict["loss"].requires_grad))

        def on_before_save_ckpt(self, ckpt_path: Path) -> None:
            calls.append(("before_save", ckpt_path.name, ckpt_path.exists()))

        def on_after_save_ckpt(self, ckpt_path: Path) -> None:
            calls.append(("after_save", ckpt_path.name, ckpt_path.exists()))

        def on_training_end(self, state: mlfab.State) -> None:
            calls.append(("training_end", state.num_steps))

    run(Hooks, tmp_path, batches_per_step=2, max_steps=3)  # Two batches a step: one step_start per step.
    assert calls == [
        ("training_start", 0),
        ("step_start", 0),
        ("step_end", 1, ["loss"], False),
        ("step_start", 1),
        ("step_end", 2, ["loss"], False),
        ("step_start", 2),
        ("step_end", 3, ["loss"], False),
        ("before_save", "last.ckpt", False),
        ("after_save", "last.ckpt", True),
        ("training_end", 3),
    ]


def test_learning_rate_decayed_in_on_step_start_is_applied(tmp_path: Path) -> None:
    class Decaying(Json):
        def on_step_start(self, state: mlfab.State) -> None:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = 0.1 * 0.5**state.num_steps

    exp = run(Decaying, tmp_path)
    assert train_lines(exp, "optim/lr") == [(0, 0.1), (1, 0.05), (2, 0.025), (3, 0.0125)]


def test_on_training_end_runs_when_training_fails(tmp_path: Path) -> None:
    ended: list[int] = []

    class Failing(BoringTask):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            if state.num_steps == 2:
                raise RuntimeError("boom")
            return super().get_loss(batch, state)

        def on_training_end(self, state: mlfab.State) -> None:
            ended.append(state.num_steps)

    with pytest.raises(RuntimeError, match="boom"):
        run(Failing, tmp_path)
    assert ended == [2]


def test_values_logged_when_training_ends_are_written_also_when_it_fails(tmp_path: Path) -> None:
    """`log_*` in `on_training_end` is written at the last step (it was buffered and never flushed); when an error
    ends training, so are the values the failed step logged before it, at that step."""

    class Ending(Json):
        fail_at: int | None = None

        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            self.log_scalar("seen_step", state.num_steps)
            if state.num_steps == self.fail_at:
                raise RuntimeError("boom")
            return super().get_loss(batch, state)

        def on_training_end(self, state: mlfab.State) -> None:
            self.log_scalar("ended_at", state.num_steps)

    exp = run(Ending, tmp_path / "ok")
    assert train_lines(exp, "value/ended_at") == [(3, 4)]
    Ending.fail_at = 2
    with pytest.raises(RuntimeError, match="boom"):
        run(Ending, tmp_path / "failed")
    exp = tmp_path / "failed" / "run"
    assert train_lines(exp, "value/ended_at") == [(2, 2)] and train_lines(exp, "value/seen_step")[-1] == (2, 2)


def test_build_optimizer_with_the_model_argument_and_an_optimizer_builder(tmp_path: Path) -> None:
    class OldSignature(BoringTask):
        def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:  # type: ignore[override]
            return torch.optim.SGD(model.parameters(), lr=0.01)

    class Builder(BoringTask):
        def get_optimizer_builder(self) -> Any:
            return lambda model: torch.optim.Adam(model.parameters(), lr=0.01)

    for task_cls, expected in ((OldSignature, torch.optim.SGD), (Builder, torch.optim.Adam)):
        task = task_cls(BoringConfig(max_steps=1))
        assert type(task.configure_optimizers()) is expected


def test_optimizer_and_scheduler_pair_steps_every_optimizer_step(tmp_path: Path) -> None:
    class Scheduled(Json):
        def build_optimizer(self, model: nn.Module | None = None) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)

    exp = run(Scheduled, tmp_path)
    lines = train_lines(exp, "optim/lr")
    assert [step for step, _ in lines] == [0, 1, 2, 3]
    assert [lr for _, lr in lines] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_a_scheduler_on_the_default_optimizer_and_its_warmup_is_refused(tmp_path: Path) -> None:
    class Scheduled(BoringTask):
        def build_optimizer(self, model: nn.Module | None = None) -> Any:
            optimizer = super().build_optimizer()
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)

    with pytest.raises(mlfab.TaskDefinitionError, match=r"warmup_steps=5\) also sets the rate. Set warmup_steps=0"):
        run(Scheduled, tmp_path, warmup_steps=5)

    class LightningDict(BoringTask):  # Lightning's own form of the same thing.
        def build_optimizer(self, model: nn.Module | None = None) -> Any:
            optimizer = super().build_optimizer()
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)}

    with pytest.raises(mlfab.TaskDefinitionError, match=r"warmup_steps=5\) also sets the rate"):
        run(LightningDict, tmp_path / "dict", warmup_steps=5)
    exp = run(Scheduled, tmp_path / "no_warmup", warmup_steps=0)  # Without warmup the schedule sets the rate.
    assert (exp / "checkpoints" / "last.ckpt").is_file()


def test_set_training_over_ends_after_that_step(tmp_path: Path) -> None:
    class Stopping(Json):
        def on_step_end(self, state: mlfab.State, loss_dict: dict[str, Tensor]) -> None:
            if state.num_steps == 2:
                self.set_training_over()

    exp = run(Stopping, tmp_path, max_steps=100)
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert [step for step, _ in train_lines(exp, "loss/loss")] == [0, 1]


def test_set_training_over_in_on_training_start_trains_no_step(tmp_path: Path) -> None:
    """0.2 asked before each step, the first one too ("on resume, stop if done"); mlfab trained one step first."""

    class Done(Json):
        def on_training_start(self, state: mlfab.State) -> None:
            self.set_training_over()

    exp = run(Done, tmp_path, max_steps=100)
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 0
    assert train_lines(exp, "loss/loss") == []


def test_get_batch_size_fills_an_unset_batch_size(tmp_path: Path) -> None:
    class Sized(BoringTask):
        def get_batch_size(self) -> int:
            return 5

    exp = run(Sized, tmp_path, batch_size=None, max_steps=1)
    assert "batch_size: 5\n" in (exp / "config.yaml").read_text()
    with pytest.raises(mlfab.TaskDefinitionError, match=r"no batch_size: set it, or override `get_batch_size"):
        BoringTask(BoringConfig(batch_size=None))  # type: ignore[arg-type]


@dataclass(kw_only=True)
class PlainConfig(mlfab.Config):
    """A 0.2 config: `batch_size` as mlfab.Config declares it (BoringConfig gives it a default of its own)."""

    in_dim: int = 4
    max_steps: int | None = 2
    valid_every_n_steps: int | None = None
    valid_batches: int = 2


class SizedByTask(BoringTask, mlfab.Task[PlainConfig]):
    def get_batch_size(self) -> int:
        return 5


@pytest.mark.parametrize(
    ("configs", "argv"),
    [
        ((PlainConfig(batch_size=None),), []),
        ((PlainConfig(batch_size=None),), ["batch_size=null"]),
        (({"batch_size": None},), []),
        ((PlainConfig(batch_size=3),), ["batch_size=null"]),
    ],
)
def test_get_batch_size_gives_a_batch_size_left_null_by_any_source(
    tmp_path: Path, configs: tuple[Any, ...], argv: list[str]
) -> None:
    """mlfab.Config's `batch_size` was a required int: every launch of a config that left it None (the 0.2 way)
    stopped with "the following arguments are required: config.batch_size"."""
    SizedByTask.launch(*configs, argv=[*argv, f"exp_dir={tmp_path}"])
    assert "batch_size: 5\n" in (tmp_path / "config.yaml").read_text()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["mlfab"]["num_samples"] == 10


def test_a_per_sample_loss_is_summed_and_divided_by_the_batch_size(tmp_path: Path) -> None:
    class PerSample(Json):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> dict[str, Tensor]:
            x, y = batch
            squared = F.mse_loss(self(x), y, reduction="none")  # (B,)
            return {"mse": squared, "mse_mean": squared.mean().detach() + 0 * squared.sum()}

    exp = run(PerSample, tmp_path)
    assert [v for _, v in train_lines(exp, "loss/mse")] == pytest.approx(
        [v for _, v in train_lines(exp, "loss/mse_mean")]
    )


def test_state_helpers_field_without_help_and_use_cli(tmp_path: Path) -> None:
    state = mlfab.State.init_state()
    assert (state.num_steps, state.phase, state.training) == (0, "train", True)
    later = mlfab.State(num_steps=7, num_samples=0, num_valid_steps=3, phase="valid", start_time_s=0, elapsed_time_s=0)
    assert (later.num_phase_steps("train"), later.num_phase_steps("valid"), later.training) == (7, 3, False)

    @dataclass(kw_only=True)
    class Config(BoringConfig):
        extra: int = mlfab.field(1)  # No help, as 0.2 allowed.

    class WithExtra(mlfab.Task[Config]):
        def __init__(self, config: Config) -> None:
            super().__init__(config)
            self.layer = nn.Linear(config.in_dim, 1)

        get_dataset, forward, get_loss = BoringTask.get_dataset, BoringTask.forward, BoringTask.get_loss

    WithExtra.launch(Config(max_steps=1, exp_dir=str(tmp_path / "cli")), use_cli=["extra=3"])
    assert "extra: 3\n" in (tmp_path / "cli" / "config.yaml").read_text()
    with pytest.raises(mlfab.TaskDefinitionError, match="give argv or use_cli, not both"):
        WithExtra.launch(Config(), argv=[], use_cli=False)


@pytest.mark.parametrize("name", sorted(__import__("mlfab.declaration").declaration.REPLACED_0_2_METHODS))
def test_overriding_a_method_of_0_2s_own_loop_is_refused_with_its_replacement(name: str) -> None:
    from mlfab.declaration import REPLACED_0_2_METHODS

    replacement = REPLACED_0_2_METHODS[name]
    with pytest.raises(mlfab.TaskDefinitionError, match=rf"Old\.{name} overrides a method of mlfab 0\.2") as error:
        type("Old", (BoringTask,), {name: lambda self, *args: None})
    assert replacement in str(error.value)


def test_an_init_whose_config_parameter_has_another_name_is_refused_at_class_definition() -> None:
    """The command line and `load_from_checkpoint` pass the config as `config=`: `def __init__(self, cfg)` failed
    deep inside jsonargparse ("No action for key ...") at launch."""
    with pytest.raises(mlfab.TaskDefinitionError, match=r"Renamed\.__init__ takes its config as 'cfg'; name it"):

        class Renamed(mlfab.Task[BoringConfig]):
            def __init__(self, cfg: BoringConfig) -> None:
                super().__init__(cfg)

    class Forwarding(mlfab.Task[BoringConfig]):  # A base that forwards everything stays allowed.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)


class Counting(Json):
    """Keeps a count of its training batches in checkpoints the mlfab 0.2 way."""

    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.seen_batches = 0

    def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
        self.seen_batches += state.phase == "train"
        return super().get_loss(batch, state)

    def task_state_dict(self) -> dict[str, Any]:
        return {"seen_batches": self.seen_batches}

    def load_task_state_dict_(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> None:
        self.seen_batches = state_dict["seen_batches"]


def test_task_state_dict_is_saved_and_restored_on_resume_and_load(tmp_path: Path) -> None:
    """0.2's `task_state_dict` / `load_task_state_dict_` were accepted and never called: the state was lost."""
    exp = run(Counting, tmp_path, max_steps=4)
    run(Counting, tmp_path, max_steps=6)
    assert torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["mlfab"]["task_state"] == {
        "seen_batches": 6
    }
    assert Counting.load_from_checkpoint(exp / "checkpoints" / "last.ckpt").seen_batches == 6


def test_on_step_end_gets_the_steps_mean_loss_over_its_batches(tmp_path: Path) -> None:
    """0.2 passed the mean over the step's `batches_per_step` batches (what it logged); it got the last batch's."""
    per_batch: list[float] = []
    got: list[float] = []

    class StepEnd(Json):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            loss = super().get_loss(batch, state)
            per_batch.extend([float(loss.detach())] if state.phase == "train" else [])
            return loss

        def on_step_end(self, state: mlfab.State, loss_dict: dict[str, Tensor]) -> None:
            got.append(float(loss_dict["loss"]))

    exp = run(StepEnd, tmp_path, max_steps=3, batches_per_step=2)
    means = [(a + b) / 2 for a, b in zip(per_batch[::2], per_batch[1::2], strict=True)]
    assert got == pytest.approx(means, rel=1e-6) and len(got) == 3
    assert [v for _, v in train_lines(exp, "loss/loss")] == pytest.approx(means, rel=1e-5)


def test_log_train_step_runs_without_autograd(tmp_path: Path) -> None:
    """0.2 ran `log_train_step` under `torch.no_grad()`: a value logged from the output held its graph (and the
    activations) until the logger wrote it."""
    logged: list[bool] = []

    class Logs(Json):
        def get_loss(self, batch: tuple[Tensor, Tensor], state: mlfab.State) -> Tensor:
            x, y = batch
            output = self(x)
            self.log_step(batch, output, state)
            return F.mse_loss(output, y)

        def log_train_step(self, batch: Any, output: Tensor, state: mlfab.State) -> None:
            logged.append(output.mean().requires_grad)
            self.log_scalar("output_mean", output.mean())

    exp = run(Logs, tmp_path, max_steps=2)
    assert logged == [False, False] and len(train_lines(exp, "value/output_mean")) == 2
