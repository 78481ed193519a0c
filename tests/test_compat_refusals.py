"""mlfab 0.2 leftovers refused rather than silently ignored: more methods of 0.2's own loop, those a mixin class
brings, and 0.2 settings values that would change a run; and the default optimizer's weight decay on every weight
matrix, as in 0.2."""

from pathlib import Path

import pytest
import torch
from torch import nn

import mlfab
from mlfab.testing import BoringConfig, BoringTask

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------------------------------------------------------------
# Methods of mlfab 0.2's Task that its loop called and nothing here calls.

NEWLY_REFUSED = {
    "load_ckpt_": "`--ckpt_path`",
    "save_ckpt": "`save_every_n_steps`",
    "get_ckpt_path": "<exp_dir>/checkpoints",
    "get_wrapped_model": "`strategy`",
    "write_logs": "`mlfab.PlainLogger`",
    "log_loss_dict": "`loss/<name>`",
    "batches_per_step_schedule": "`batches_per_step`",
    "get_device_manager": "`accelerator`",
    "stage_environment": "`provenance/`",
}


@pytest.mark.parametrize("name", sorted(NEWLY_REFUSED))
def test_more_methods_of_0_2s_loop_are_refused_naming_what_does_it_now(name: str) -> None:
    with pytest.raises(mlfab.TaskDefinitionError, match=rf"Old\.{name} overrides a method of mlfab 0\.2") as error:
        type("Old", (BoringTask,), {name: lambda self, *args: None})
    assert NEWLY_REFUSED[name] in str(error.value)


def test_task_state_dict_methods_are_not_refused() -> None:
    """0.2's `task_state_dict` / `load_task_state_dict_` are supported (not in the table)."""

    class Kept(BoringTask):
        def task_state_dict(self) -> dict:
            return super().task_state_dict()

        def load_task_state_dict_(self, state_dict: dict) -> None:
            super().load_task_state_dict_(state_dict)

    assert Kept(BoringConfig())


def test_compile_model_names_the_compile_key() -> None:
    with pytest.raises(mlfab.TaskDefinitionError) as error:
        type("Old", (BoringTask,), {"compile_model": lambda self, model: model})
    assert "Use the config key `compile`" in str(error.value)
    assert "no compile option" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# The same methods, and the mode-switch hooks, from a mixin class.


def test_a_0_2_method_from_a_mixin_is_refused_naming_the_mixin() -> None:
    class DataMixin:  # 0.2 codebases shared loader and step customisations through mixins.
        def get_dataloader(self, dataset: object, phase: str) -> None:
            raise AssertionError("never called")

    with pytest.raises(mlfab.TaskDefinitionError) as error:

        class ViaMixin(DataMixin, BoringTask):
            pass

    message = str(error.value)
    assert message.startswith("DataMixin (a base class of ViaMixin).get_dataloader overrides a method of mlfab 0.2")
    assert "Lightning's `train_dataloader()`" in message


def test_a_mode_switch_from_a_mixin_without_super_is_refused() -> None:
    class KeepDropout:
        def on_validation_model_eval(self) -> None:
            pass  # The training weights of a schedule-free optimizer would be evaluated.

    with pytest.raises(mlfab.TaskDefinitionError) as error:

        class Mixed(KeepDropout, BoringTask):
            pass

    assert str(error.value).startswith(
        "KeepDropout (a base class of Mixed).on_validation_model_eval does not call super().on_validation_model_eval()"
    )

    class CallsSuper:
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()  # type: ignore[misc]

    class Fine(CallsSuper, BoringTask):
        pass

    assert Fine(BoringConfig())


# ---------------------------------------------------------------------------------------------------------------------
# The default optimizer's weight decay: every parameter with ndim >= 2, embeddings too, as mlfab 0.2 (README).


class Sequence(BoringTask):
    def __init__(self, config: BoringConfig) -> None:
        super().__init__(config)
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.rnn = nn.LSTM(8, 8)
        self.pos = nn.Parameter(torch.randn(16, 8))  # A learned positional table.
        self.norm = nn.LayerNorm(8)


def test_default_optimizer_decays_every_parameter_of_two_dimensions_as_0_2_did() -> None:
    """0.2 listed norms and embeddings as never decayed, but met every parameter first through the task (its root
    module, of neither kind): its embedding tables were decayed, and mlfab's were not."""
    task = Sequence(BoringConfig(weight_decay=0.1))
    optimizer = task.build_optimizer()
    names = {id(p): n for n, p in task.named_parameters()}
    decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert decay[0.1] == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "emb.weight",
        "layer.weight",
        "pos",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l0",
    ]
    assert "norm.weight" in decay[0.0] and "attn.in_proj_bias" in decay[0.0]


# ---------------------------------------------------------------------------------------------------------------------
# mlfab 0.2's settings values that would change the run.

V02_DEVICE = """\
device:
  cpu: true
  gpu: ${oc.env:USE_GPU,1}
  metal: ${oc.env:USE_METAL,1}
  use_fp64: false
  use_fp32: false
  use_bf16: false
  use_fp16: false
experiment:
  default_random_seed: 1337
  max_workers: 32
  multiprocessing_start_method: forkserver
"""


@pytest.fixture
def rc(monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("USE_GPU", "USE_METAL"):
        monkeypatch.delenv(var, raising=False)
    path = Path.cwd().parent / "home" / ".mlfab.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(V02_DEVICE)
    return path


def test_0_2_device_settings_stop_the_launch_naming_file_key_and_config_key(rc: Path, tmp_path: Path) -> None:
    local = Path.cwd() / "mlfab.yml"
    local.write_text("device:\n  gpu: false\n  use_bf16: true\n")
    with pytest.raises(mlfab.SettingsError) as error:
        BoringTask.launch(BoringConfig(max_steps=1), argv=[])
    message = str(error.value)
    assert f"`device.gpu` in {local} is false: mlfab 0.2 then trained on the CPU" in message
    assert "(`accelerator=cpu` on the command line, `accelerator: cpu` in a config file)" in message
    assert f"`device.use_bf16` in {local} is true" in message
    assert "`precision=bf16-mixed` on the command line" in message
    assert list(Path.cwd().iterdir()) == [local]  # No run started in ./runs.


def test_0_2_default_file_is_accepted_and_a_local_file_may_set_the_defaults_back(rc: Path) -> None:
    rc.write_text(V02_DEVICE.replace("use_fp16: false", "use_fp16: true"))
    (Path.cwd() / "mlfab.yml").write_text("device:\n  use_fp16: false\n")  # Merged over the user file.
    assert mlfab.get_run_dir(missing_ok=True) is None
    rc.write_text(V02_DEVICE)
    (Path.cwd() / "mlfab.yml").unlink()
    assert mlfab.get_run_dir(missing_ok=True) is None


def test_use_gpu_0_with_0_2s_file_names_the_variable_reading(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_GPU", "0")
    with pytest.raises(mlfab.SettingsError) as error:
        mlfab.get_run_dir(missing_ok=True)
    assert f"`device.gpu` in {rc} is '${{oc.env:USE_GPU,1}}', read as false" in str(error.value)
    assert "`accelerator=cpu`" in str(error.value)
    monkeypatch.setenv("USE_GPU", "1")
    assert mlfab.get_run_dir(missing_ok=True) is None


def test_non_default_0_2_seed_names_the_seed_key(rc: Path) -> None:
    rc.write_text(V02_DEVICE.replace("default_random_seed: 1337", "default_random_seed: 42"))
    with pytest.raises(mlfab.SettingsError) as error:
        mlfab.get_run_dir(missing_ok=True)
    assert f"`experiment.default_random_seed` in {rc} is 42: mlfab 0.2 then seeded with it" in str(error.value)
    assert "`seed=42` on the command line, `seed: 42` in a config file" in str(error.value)


def test_a_0_2_device_value_that_is_no_boolean_is_refused(rc: Path) -> None:
    rc.write_text(V02_DEVICE.replace("use_fp64: false", "use_fp64: maybe"))
    with pytest.raises(mlfab.SettingsError, match=r"`device.use_fp64` in .* is 'maybe': it must be true or false"):
        mlfab.get_run_dir(missing_ok=True)
    # Read as int(): 1337.9 was 0.2's default seed 1337 and accepted; 2 was true.
    rc.write_text(V02_DEVICE.replace("use_fp64: false", "use_fp64: 2"))
    with pytest.raises(mlfab.SettingsError, match=r"`device.use_fp64` in .* is 2: it must be true or false"):
        mlfab.get_run_dir(missing_ok=True)
    rc.write_text(V02_DEVICE.replace("default_random_seed: 1337", "default_random_seed: 1337.9"))
    with pytest.raises(mlfab.SettingsError, match=r"`experiment.default_random_seed` in .* is 1337.9: it must be an"):
        mlfab.get_run_dir(missing_ok=True)


V02_OTHERS = """\
error_handling:
  enabled: true
  maximum_exceptions: 10
  sleep_backoff: 0.1
  log_full_exception: false
logging:
  hide_third_party_logs: true
  log_level: INFO
triton:
  use_triton_if_available: true
"""


def test_0_2_data_and_logging_values_stop_the_launch_saying_what_to_do(rc: Path) -> None:
    rc.write_text(V02_DEVICE + V02_OTHERS)
    assert mlfab.get_run_dir(missing_ok=True) is None  # 0.2's defaults, as its file holds them, are accepted.
    changed = {
        "maximum_exceptions: 10": "maximum_exceptions: 100",
        "sleep_backoff: 0.1": "sleep_backoff: '0.5'",
        "log_level: INFO": "log_level: DEBUG",
        "max_workers: 32": "max_workers: 4",
        "forkserver": "spawn",
        "use_triton_if_available: true": "use_triton_if_available: false",  # 0.2's own kernels: either value holds.
    }
    text = V02_DEVICE + V02_OTHERS
    for old, new in changed.items():
        text = text.replace(old, new)
    rc.write_text(text)
    with pytest.raises(mlfab.SettingsError) as error:
        BoringTask.launch(BoringConfig(max_steps=1), argv=[])
    lines = str(error.value).splitlines()
    assert lines == [
        f"`experiment.max_workers` in {rc} is 4: mlfab 0.2 then capped its default dataloader worker count at it, but "
        "mlfab does not read this setting. Set the config key instead (`num_dataloader_workers=N` on the command line, "
        "`num_dataloader_workers: N` in a config file) and remove `experiment.max_workers` from that file.",
        f"`experiment.multiprocessing_start_method` in {rc} is 'spawn': mlfab 0.2 then started dataloader workers that "
        "way, but mlfab has no such setting; mlfab's workers start as torch's DataLoader starts them (fork on Linux). "
        "Remove `experiment.multiprocessing_start_method` from that file (0.2's default, 'forkserver', is accepted).",
        f"`error_handling.maximum_exceptions` in {rc} is 100: mlfab 0.2 then stopped after that many failing samples, "
        "but mlfab does not read this setting. Set the config key instead (`max_bad_samples_in_a_row=100` on the "
        "command line, `max_bad_samples_in_a_row: 100` in a config file) and remove "
        "`error_handling.maximum_exceptions` from that file.",
        f"`error_handling.sleep_backoff` in {rc} is '0.5', read as 0.5: mlfab 0.2 then slept that long between "
        "failures, but mlfab has no such setting; mlfab skips a failing sample at once (no sleep); the limit is "
        "`max_bad_samples_in_a_row`. Remove `error_handling.sleep_backoff` from that file (0.2's default, 0.1, is "
        "accepted).",
        f"`logging.log_level` in {rc} is 'DEBUG': mlfab 0.2 then set the root logger's level to it, but mlfab has no "
        "such setting; mlfab leaves the levels of Python's `logging` to you (`logging.getLogger(name).setLevel(...)`). "
        "Remove `logging.log_level` from that file (0.2's default, 'INFO', is accepted).",
    ]
    assert not (Path.cwd() / "runs").exists()


def test_0_2_error_handling_off_names_the_limit_of_one(rc: Path) -> None:
    rc.write_text(V02_DEVICE + V02_OTHERS.replace("enabled: true", "enabled: false"))
    with pytest.raises(mlfab.SettingsError) as error:
        mlfab.get_run_dir(missing_ok=True)
    assert f"`error_handling.enabled` in {rc} is false: mlfab 0.2 then raised a sample's first exception" in str(
        error.value
    )
    assert "`max_bad_samples_in_a_row=1` on the command line" in str(error.value)
    rc.write_text(V02_DEVICE + V02_OTHERS.replace("maximum_exceptions: 10", "maximum_exceptions: many"))
    with pytest.raises(mlfab.SettingsError, match=r"is 'many': it must be an integer \(mlfab 0.2's default is 10\)"):
        mlfab.get_run_dir(missing_ok=True)
