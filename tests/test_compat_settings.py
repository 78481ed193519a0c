"""mlfab 0.2 fidelity: a `~/.mlfab.yml` written by mlfab 0.2 (OmegaConf `${oc.env:...}` values), 0.2's
`get_run_dir(missing_ok=...)`, and YAML files given to `launch()` found next to the task's source file from any
working directory."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import mlfab
from mlfab.cli.args import find_config_file
from mlfab.settings import default_run_dir, load_settings
from mlfab.testing import BoringConfig, BoringTask

ROOT = Path(__file__).resolve().parents[1]

# The file mlfab 0.2.10 writes on first use (`OmegaConf.save` of its `UserConfig` in mlfab/core/conf.py), verbatim.
V02_FILE = """\
error_handling:
  enabled: true
  maximum_exceptions: 10
  backoff_after: 5
  sleep_backoff: 0.1
  sleep_backoff_power: 2.0
  log_full_exception: false
  flush_exception_summary_every: 500
  report_top_n_exception_types: 5
  exception_location_traceback_depth: 3
logging:
  hide_third_party_logs: true
  log_level: INFO
device:
  cpu: true
  gpu: ${oc.env:USE_GPU,1}
  metal: ${oc.env:USE_METAL,1}
  use_fp64: false
  use_fp32: false
  use_bf16: false
  use_fp16: false
triton:
  use_triton_if_available: true
experiment:
  default_random_seed: 1337
  max_workers: 32
  multiprocessing_start_method: forkserver
directories:
  run: ${oc.env:RUN_DIR}
  data: ${oc.env:DATA_DIR}
  pretrained_models: ${oc.env:MODEL_DIR}
"""


@pytest.fixture
def rc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user settings file, as MLFABRC_PATH names it (conftest clears RUN_DIR, DATA_DIR and MODEL_DIR and runs
    each test in an empty working directory)."""
    path = tmp_path / "home" / ".mlfab.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("MLFABRC_PATH", str(path))
    return path


def write_directories(path: Path, **directories: str) -> None:
    """A 0.2-style file whose directories a user edited, the other sections as 0.2 wrote them."""
    text = V02_FILE.split("directories:\n")[0] + "directories:\n"
    text += "".join(f"  {key}: {value}\n" for key, value in directories.items())
    path.write_text(text)


# ---------------------------------------------------------------------------------------------------------------------
# The file mlfab 0.2 wrote, untouched.


@pytest.mark.unit
def test_v02_file_directories_follow_their_environment_variables(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc.write_text(V02_FILE)
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    monkeypatch.setenv("DATA_DIR", "/env/data")
    monkeypatch.setenv("MODEL_DIR", "/env/models")
    assert mlfab.get_run_dir() == Path("/env/runs")
    assert mlfab.get_data_dir() == Path("/env/data")
    assert mlfab.get_pretrained_models_dir() == Path("/env/models")
    assert default_run_dir() == Path("/env/runs")
    assert rc.read_text() == V02_FILE  # Read as it is: not rewritten.
    assert load_settings()["device"]["gpu"] == "${oc.env:USE_GPU,1}"  # 0.2's other sections are kept, unused.


@pytest.mark.unit
def test_v02_file_with_variables_unset_reads_as_not_set(rc: Path) -> None:
    """As 0.2 read it: `${oc.env:DATA_DIR}` with DATA_DIR unset is a directory not set (never a literal path)."""
    rc.write_text(V02_FILE)
    with pytest.raises(mlfab.SettingsError) as info:
        mlfab.get_data_dir()
    message = str(info.value)
    assert "The data directory is not set" in message
    assert f"`directories.data` in {rc}" in message
    assert "'${oc.env:DATA_DIR}' there, and DATA_DIR is not set" in message
    assert mlfab.get_run_dir(missing_ok=True) is None
    assert default_run_dir() == Path.cwd() / "runs"  # Launch falls back to ./runs, not ./${oc.env:RUN_DIR}.


@pytest.mark.integration
def test_v02_file_launch_puts_the_run_under_run_dir(
    rc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc.write_text(V02_FILE)
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "env_runs"))
    BoringTask.launch(BoringConfig(max_steps=2, valid_every_n_steps=None, valid_batches=1), argv=[])
    assert [p.name for p in (tmp_path / "env_runs" / "boring_task").iterdir()] == ["run_0"]
    assert list(Path.cwd().iterdir()) == []  # Nothing in ./${oc.env:RUN_DIR}/ (nor ./runs).


# ---------------------------------------------------------------------------------------------------------------------
# Values a 0.2 user wrote with OmegaConf's `oc.env` resolver. Each expected value is what OmegaConf 2.4 (0.2's
# reader) makes of it, with ROOT=/mnt/storage and UNSET not set.


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${oc.env:ROOT}/data", "/mnt/storage/data"),
        ("${oc.env:ROOT,/ignored}/data", "/mnt/storage/data"),
        ("${oc.env:UNSET,/fallback/data}", "/fallback/data"),
        ("'${oc.env:UNSET, /fallback/data }'", "/fallback/data"),
        ("'${oc.env: ROOT }'", "/mnt/storage"),
        ("\"${oc.env:UNSET,'/a,b'}\"", "/a,b"),
        ("'${oc.env:UNSET,\"/q\"}'", "/q"),
        ("${oc.env:UNSET,${oc.env:ROOT}/nested}", "/mnt/storage/nested"),
        ("'\\${oc.env:ROOT}'", "${oc.env:ROOT}"),  # OmegaConf's escape: a literal ${.
        ("${oc.env:UNSET,null}", "/env/data"),  # null: not set, so DATA_DIR.
        ("${oc.env:EMPTY}", "/env/data"),  # Set but empty: not set, so DATA_DIR.
    ],
)
def test_oc_env_values_resolve_as_omegaconf_does(
    rc: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("ROOT", "/mnt/storage")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.delenv("UNSET", raising=False)
    monkeypatch.setenv("DATA_DIR", "/env/data")
    write_directories(rc, data=value)
    assert mlfab.get_data_dir() == Path(expected)


@pytest.mark.unit
def test_oc_env_in_local_mlfab_yml(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc.write_text(V02_FILE)
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    Path("mlfab.yml").write_text("directories:\n  run: ${oc.env:SCRATCH}/runs\n")
    assert mlfab.get_run_dir() == Path("/scratch/me/runs")
    assert default_run_dir() == Path("/scratch/me/runs")


@pytest.mark.unit
@pytest.mark.parametrize("value", ["${oc.env:SCRATCH}/data", "${SCRATCH}/data", "$SCRATCH/data"])
def test_unset_variable_names_file_key_and_variable(rc: Path, value: str) -> None:
    write_directories(rc, data=value)
    with pytest.raises(mlfab.SettingsError) as info:
        mlfab.get_data_dir()
    message = str(info.value)
    assert f"`directories.data` in {rc} is {value!r}" in message
    assert "the environment variable SCRATCH is not set" in message
    assert "export SCRATCH=" in message and "${oc.env:SCRATCH,/path/to/data}" in message


@pytest.mark.unit
def test_unset_variable_in_run_entry_stops_launch_instead_of_using_dot_runs(rc: Path) -> None:
    write_directories(rc, run="${oc.env:SCRATCH}/runs")
    Path("mlfab.yml").write_text("directories:\n  data: ${oc.env:DATA_HOME}\n")
    with pytest.raises(mlfab.SettingsError, match=r"`directories.run` in .*\.mlfab\.yml is .* SCRATCH is not set"):
        default_run_dir()
    with pytest.raises(mlfab.SettingsError, match="SCRATCH is not set"):
        mlfab.get_run_dir(missing_ok=True)  # Set, but wrong: not "missing".
    local = re.escape(str(Path.cwd() / "mlfab.yml"))
    with pytest.raises(mlfab.SettingsError, match=rf"`directories.data` in {local} is .* DATA_HOME is not set"):
        mlfab.get_data_dir()


@pytest.mark.unit
def test_other_omegaconf_interpolations_are_refused_clearly(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", "/env/data")
    write_directories(rc, data="/d", pretrained_models="${directories.data}/models")
    with pytest.raises(mlfab.SettingsError) as info:
        mlfab.get_pretrained_models_dir()
    message = str(info.value)
    assert f"`directories.pretrained_models` in {rc}" in message
    assert "${oc.env:VAR,default}" in message and "not the OmegaConf interpolation ${directories.data}" in message


# ---------------------------------------------------------------------------------------------------------------------
# get_run_dir(missing_ok=...), as in 0.2.


@pytest.mark.unit
def test_get_run_dir_missing_ok(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc.write_text(V02_FILE)
    assert mlfab.get_run_dir(missing_ok=True) is None
    with pytest.raises(mlfab.SettingsError, match="The run directory is not set"):
        mlfab.get_run_dir(missing_ok=False)
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    assert mlfab.get_run_dir(missing_ok=True) == Path("/env/runs")
    assert mlfab.get_run_dir(missing_ok=False) == Path("/env/runs")


# ---------------------------------------------------------------------------------------------------------------------
# YAML files named relative to the working directory, else next to the task's source file.

TASK_MODULE = """
from mlfab.testing import BoringTask


class ProjTask(BoringTask):
    pass
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, type[BoringTask]]:
    """A task defined in `<tmp>/proj/proj_task.py`, imported as a script's task would be (not from the cwd)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "proj_task.py").write_text(TASK_MODULE)
    spec = importlib.util.spec_from_file_location(f"proj_task_{id(tmp_path)}", proj / "proj_task.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return proj, module.ProjTask


@pytest.mark.unit
def test_relative_yaml_found_next_to_source_and_cwd_first(project: tuple[Path, type[BoringTask]]) -> None:
    proj, task = project
    (proj / "quick.yaml").write_text("max_steps: 1\n")
    (proj / "conf").mkdir()
    (proj / "conf" / "deep.yaml").write_text("max_steps: 2\n")
    assert find_config_file(task, "quick.yaml") == proj / "quick.yaml"
    assert find_config_file(task, Path("conf/deep.yaml")) == proj / "conf" / "deep.yaml"
    Path("quick.yaml").mkdir()  # A directory of that name in the cwd is not the file.
    assert find_config_file(task, "quick.yaml") == proj / "quick.yaml"
    Path("quick.yaml").rmdir()
    Path("quick.yaml").write_text("max_steps: 3\n")
    found = find_config_file(task, "quick.yaml")
    assert found == Path.cwd() / "quick.yaml" and found.is_absolute()


@pytest.mark.unit
def test_missing_yaml_error_lists_both_places_tried(project: tuple[Path, type[BoringTask]]) -> None:
    proj, task = project
    with pytest.raises(mlfab.ConfigError) as info:
        task.launch(argv=["nope.yaml"])
    message = str(info.value)
    assert message.startswith("Config file 'nope.yaml' not found; looked for ")
    assert f"{Path.cwd() / 'nope.yaml'} (in the working directory)" in message
    assert f"{proj / 'nope.yaml'} (next to ProjTask's source file)" in message


SCRIPT = """
from mlfab.testing import BoringConfig, BoringTask


class ScriptTask(BoringTask):
    pass


if __name__ == "__main__":
    ScriptTask.launch(BoringConfig(max_steps=5, valid_every_n_steps=None, valid_batches=1), "quick.yaml")
"""


@pytest.mark.integration
def test_script_launch_yaml_found_next_to_script_from_another_cwd(tmp_path: Path) -> None:
    """`python ../proj/train.py more.yaml`, run from elsewhere: launch's "quick.yaml" and the command line's
    "more.yaml" are both read from next to train.py."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    (proj / "train.py").write_text(SCRIPT)
    (proj / "quick.yaml").write_text("max_steps: 2\nlearning_rate: 0.01\n")
    (proj / "more.yaml").write_text(yaml.safe_dump({"model": {"config": {"learning_rate": 0.02}}, "trainer": {}}))
    env = {**os.environ, "RUN_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, os.path.join("..", "proj", "train.py"), "more.yaml"]
    proc = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "runs" / "script_task" / "run_0" / "config.yaml").read_text())
    assert config["model"]["config"]["max_steps"] == 2  # quick.yaml, given to launch()
    assert config["model"]["config"]["learning_rate"] == 0.02  # more.yaml, on the command line
    assert list(elsewhere.iterdir()) == []
