"""Tests for mlfab.settings: the user settings file, ./mlfab.yml, and the directory environment variables."""

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import mlfab
from mlfab.settings import DEFAULT_SETTINGS, default_run_dir, load_settings, settings_path

pytestmark = pytest.mark.unit


@pytest.fixture
def rc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user settings file, in a directory that does not exist yet (conftest already clears the directory
    environment variables and runs each test in an empty working directory)."""
    path = tmp_path / "home" / "sub" / ".mlfab.yml"
    monkeypatch.setenv("MLFABRC_PATH", str(path))
    return path


def _write_rc(path: Path, directories: dict[str, str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"directories": directories}))


def test_settings_path_follows_env(rc: Path) -> None:
    assert settings_path() == rc


def test_default_settings_file_written_on_first_use(rc: Path) -> None:
    assert not rc.exists()
    settings = load_settings()
    assert rc.is_file()
    assert rc.read_text() == DEFAULT_SETTINGS
    data = yaml.safe_load(rc.read_text())
    assert data == {"directories": {"run": None, "data": None, "pretrained_models": None}}
    assert settings == data


def test_existing_settings_file_is_not_overwritten(rc: Path) -> None:
    _write_rc(rc, {"data": "/somewhere"})
    before = rc.read_text()
    load_settings()
    assert rc.read_text() == before


def test_data_dir_from_env_when_file_leaves_it_empty(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", "/env/data")
    assert mlfab.get_data_dir() == Path("/env/data")
    assert rc.is_file()  # the default (empty) file was written, and the env var still applies


def test_empty_string_in_file_falls_back_to_env(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rc(rc, {"data": ""})
    monkeypatch.setenv("DATA_DIR", "/env/data")
    assert mlfab.get_data_dir() == Path("/env/data")


def test_file_value_wins_over_env(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rc(rc, {"data": "/file/data", "pretrained_models": "/file/models", "run": "/file/runs"})
    monkeypatch.setenv("DATA_DIR", "/env/data")
    monkeypatch.setenv("MODEL_DIR", "/env/models")
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    assert mlfab.get_data_dir() == Path("/file/data")
    assert mlfab.get_pretrained_models_dir() == Path("/file/models")
    assert mlfab.get_run_dir() == Path("/file/runs")


def test_file_values_expand_home_and_vars(rc: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "fakehome"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MY_ROOT", "/mnt/storage")
    _write_rc(rc, {"data": "~/datasets", "pretrained_models": "$MY_ROOT/models", "run": "${MY_ROOT}/runs"})
    assert mlfab.get_data_dir() == home / "datasets"
    assert mlfab.get_pretrained_models_dir() == Path("/mnt/storage/models")
    assert mlfab.get_run_dir() == Path("/mnt/storage/runs")


def test_local_file_merged_over_user_file(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rc(rc, {"data": "/user/data", "pretrained_models": "/user/models", "run": None})
    Path("mlfab.yml").write_text("directories:\n  data: /local/data\nlogging:\n  log_level: INFO\n")
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    assert mlfab.get_data_dir() == Path("/local/data")
    assert mlfab.get_pretrained_models_dir() == Path("/user/models")  # the local file does not set it
    assert mlfab.get_run_dir() == Path("/env/runs")
    settings = load_settings()
    assert settings["directories"] == {"data": "/local/data", "pretrained_models": "/user/models", "run": None}
    assert settings["logging"] == {"log_level": "INFO"}  # A section mlfab 0.2 wrote: kept, unused.


def test_local_file_in_other_directory_is_ignored(rc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rc(rc, {"data": "/user/data"})
    Path("mlfab.yml").write_text("directories:\n  data: /local/data\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert mlfab.get_data_dir() == Path("/user/data")


@pytest.mark.parametrize(
    ("getter", "key", "env"),
    [
        (mlfab.get_data_dir, "data", "DATA_DIR"),
        (mlfab.get_pretrained_models_dir, "pretrained_models", "MODEL_DIR"),
        (mlfab.get_run_dir, "run", "RUN_DIR"),
    ],
)
def test_unset_directory_error_names_setting_and_env(rc: Path, getter: Callable[[], Path], key: str, env: str) -> None:
    with pytest.raises(mlfab.SettingsError) as info:
        getter()
    message = str(info.value)
    assert f"directories.{key}" in message
    assert env in message
    assert str(rc) in message
    assert f"export {env}=" in message


def test_settings_error_is_an_mlfab_error(rc: Path) -> None:
    with pytest.raises(mlfab.MlfabError):
        mlfab.get_data_dir()


def test_default_run_dir_is_cwd_runs_when_unset(rc: Path) -> None:
    assert default_run_dir() == Path.cwd() / "runs"
    assert default_run_dir().parent == Path.cwd()


def test_default_run_dir_uses_env(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    assert default_run_dir() == Path("/env/runs")


def test_default_run_dir_uses_file(rc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rc(rc, {"run": "/file/runs"})
    monkeypatch.setenv("RUN_DIR", "/env/runs")
    assert default_run_dir() == Path("/file/runs")


def test_invalid_yaml_settings_file_names_the_file(rc: Path) -> None:
    rc.parent.mkdir(parents=True)
    rc.write_text("directories: [unclosed\n")
    with pytest.raises(mlfab.SettingsError) as info:
        mlfab.get_data_dir()
    message = str(info.value)
    assert str(rc) in message
    assert "not valid YAML" in message


def test_invalid_yaml_local_file_names_the_file(rc: Path) -> None:
    Path("mlfab.yml").write_text("directories:\n  data: [unclosed\n")
    with pytest.raises(mlfab.SettingsError) as info:
        load_settings()
    assert str(Path.cwd() / "mlfab.yml") in str(info.value)


def test_non_mapping_settings_file_names_the_file(rc: Path) -> None:
    rc.parent.mkdir(parents=True)
    rc.write_text("- just\n- a list\n")
    with pytest.raises(mlfab.SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert str(rc) in message
    assert "must hold a mapping" in message


def test_non_mapping_directories_section_is_a_settings_error(rc: Path) -> None:
    rc.parent.mkdir(parents=True)
    rc.write_text("directories:\n  - /data\n")
    with pytest.raises(mlfab.SettingsError):
        mlfab.get_data_dir()


def test_a_settings_path_that_is_a_directory_is_a_settings_error(rc: Path) -> None:
    """It was read as no settings at all; a missing directory's error then named the directory as the file to edit."""
    rc.mkdir(parents=True)
    with pytest.raises(mlfab.SettingsError, match=r"The mlfab settings file .*\.mlfab\.yml is not a file: point MLFAB"):
        mlfab.get_run_dir()


def test_a_directory_that_is_no_path_is_a_settings_error(rc: Path) -> None:
    rc.parent.mkdir(parents=True)
    rc.write_text("directories:\n  data: [/a, /b]\n  run: 7\n")
    with pytest.raises(mlfab.SettingsError, match=r"`directories.data` in .*\.mlfab\.yml is \['/a', '/b'\]: give one"):
        mlfab.get_data_dir()  # Was Path("['/a', '/b']").
    assert mlfab.get_run_dir() == Path("7")  # A number names a directory.
    for boolean, read in (("yes", True), ("off", False), ("true", True)):  # YAML's: runs went to a folder `True`.
        rc.write_text(f"directories:\n  run: {boolean}\n")
        with pytest.raises(mlfab.SettingsError, match=rf"`directories.run` in .* is {read}: give one path"):
            mlfab.get_run_dir()
