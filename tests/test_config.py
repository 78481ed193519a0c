"""Tests for mlfab.config: fields, how config sources resolve into one Config, and the errors a user sees."""

import dataclasses
import importlib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import mlfab
from mlfab.cli.args import short_form_args
from mlfab.config import config_to_yaml, field_help, resolve_config
from mlfab.testing import BoringTask

pytestmark = pytest.mark.unit


@dataclass
class ModelConfig:
    hidden: int = mlfab.field(32, help="Hidden size")
    depth: int = mlfab.field(2, help="Number of layers")


@dataclass(kw_only=True)
class MyConfig(mlfab.Config):
    model: ModelConfig = mlfab.field(ModelConfig(), help="The model")
    tags: list[str] = mlfab.field(["base"], help="Free-form tags")
    extra: dict[str, int] = mlfab.field({"a": 1}, help="Extra numbers")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(*sources: object) -> str:
    with pytest.raises(mlfab.ConfigError) as info:
        resolve_config(MyConfig, *sources)
    return str(info.value)


def _problem_count(message: str) -> int:
    match = re.search(r"\((\d+) problem\(s\)\)", message)
    assert match is not None, message
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------------------------------
# field


def test_callable_default_is_called_for_each_instance() -> None:
    calls = []

    def make() -> list[int]:
        calls.append(1)
        return [len(calls)]

    @dataclass
    class C:
        value: list[int] = mlfab.field(make, help="made")

    first, second = C(), C()
    assert first.value == [1]
    assert second.value == [2]
    assert len(calls) == 2


def test_mutable_list_default_is_copied_per_instance() -> None:
    first, second = MyConfig(batch_size=1), MyConfig(batch_size=1)
    first.tags.append("mine")
    assert first.tags == ["base", "mine"]
    assert second.tags == ["base"]
    assert MyConfig(batch_size=1).tags == ["base"]


def test_mutable_dict_default_is_copied_per_instance() -> None:
    first, second = MyConfig(batch_size=1), MyConfig(batch_size=1)
    first.extra["b"] = 2
    assert first.extra == {"a": 1, "b": 2}
    assert second.extra == {"a": 1}


def test_nested_default_is_deep_copied() -> None:
    @dataclass
    class C:
        nested: dict[str, list[int]] = mlfab.field({"x": [1]}, help="nested")

    first, second = C(), C()
    first.nested["x"].append(2)
    assert second.nested == {"x": [1]}


def test_dataclass_instance_default_is_copied_per_instance() -> None:
    first, second = MyConfig(batch_size=1), MyConfig(batch_size=1)
    assert first.model == ModelConfig(hidden=32, depth=2)
    assert first.model is not second.model
    first.model.hidden = 99
    assert second.model.hidden == 32


def test_immutable_default_is_plain_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(mlfab.Config)}
    assert fields["learning_rate"].default == 1e-3
    assert fields["betas"].default == (0.9, 0.999)
    assert fields["max_steps"].default is None
    assert fields["learning_rate"].default_factory is dataclasses.MISSING


def test_help_text_is_in_metadata() -> None:
    fields = {f.name: f for f in dataclasses.fields(MyConfig)}
    assert fields["model"].metadata["help"] == "The model"
    assert fields["batch_size"].metadata["help"] == (
        "Number of samples in each batch (per device); null: the task's get_batch_size()"
    )
    assert field_help(fields["tags"]) == "Free-form tags"
    assert field_help(dataclasses.field()) == ""


def test_field_without_default_is_required() -> None:
    fields = {f.name: f for f in dataclasses.fields(MyConfig)}
    assert fields["batch_size"].default is dataclasses.MISSING
    assert fields["batch_size"].default_factory is dataclasses.MISSING
    with pytest.raises(TypeError, match="batch_size"):
        MyConfig()  # type: ignore[call-arg]


def test_dataclass_class_default_is_a_factory() -> None:
    @dataclass(kw_only=True)
    class C(mlfab.Config):
        model: ModelConfig = mlfab.field(ModelConfig, help="The model")

    first, second = C(batch_size=1), C(batch_size=1)
    assert isinstance(first.model, ModelConfig)
    assert first.model is not second.model
    assert resolve_config(C, {"batch_size": 1}).model == ModelConfig()


def test_builtin_class_default_is_a_factory() -> None:
    @dataclass
    class C:
        items: list[int] = mlfab.field(list, help="items")
        table: dict[str, int] = mlfab.field(dict, help="table")

    c = C()
    assert c.items == []
    assert c.table == {}


# ---------------------------------------------------------------------------------------------------------------------
# key=value on the command line: a `fit` flag, and the plain value it sets (for explaining a refusal)


def parse_override(arg: str) -> dict:
    args, values = short_form_args(BoringTask, [arg])
    assert args == [f"--model.config.{arg}"]
    return values[0]


def test_parse_override_nests_dotted_keys_and_reads_yaml() -> None:
    assert parse_override("model.hidden=64") == {"model": {"hidden": 64}}
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
    assert parse_override("betas=[0.5,0.6]") == {"betas": [0.5, 0.6]}
    assert parse_override("max_steps=null") == {"max_steps": None}
    assert parse_override("learning_rate=0.01") == {"learning_rate": 0.01}
    assert parse_override("exp_dir=") == {"exp_dir": ""}


@pytest.mark.parametrize("arg", ["=3", "a..b=3", ".a=1"])
def test_parse_override_rejects_non_key_value(arg: str) -> None:
    with pytest.raises(mlfab.ConfigError, match="expected key=value"):
        short_form_args(BoringTask, [arg])


def test_an_argument_without_equals_is_a_config_file() -> None:
    with pytest.raises(mlfab.ConfigError, match=r"Config file 'batch_size' not found"):
        short_form_args(BoringTask, ["batch_size"])


# ---------------------------------------------------------------------------------------------------------------------
# resolve_config: sources and their order


def test_class_defaults_fill_what_sources_leave_out() -> None:
    config = resolve_config(MyConfig, {"batch_size": 8})
    assert isinstance(config, MyConfig)
    assert config.batch_size == 8
    assert config.learning_rate == 1e-3
    assert config.betas == (0.9, 0.999)
    assert config.model == ModelConfig(hidden=32, depth=2)
    assert config.tags == ["base"]


def test_dict_source() -> None:
    config = resolve_config(MyConfig, {"batch_size": 4, "model": {"hidden": 7}, "seed": 1})
    assert (config.batch_size, config.seed) == (4, 1)
    assert config.model == ModelConfig(hidden=7, depth=2)


def test_dataclass_instance_source() -> None:
    source = MyConfig(batch_size=3, model=ModelConfig(hidden=5, depth=6), warmup_steps=0)
    config = resolve_config(MyConfig, source)
    assert config == source
    assert config is not source


def test_yaml_file_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yml", "batch_size: 12\nmodel:\n  depth: 9\nbetas: [0.1, 0.2]\n")
    config = resolve_config(MyConfig, path)
    assert config.batch_size == 12
    assert config.model == ModelConfig(hidden=32, depth=9)
    assert config.betas == (0.1, 0.2)
    assert resolve_config(MyConfig, str(path)) == config


def test_empty_yaml_file_adds_nothing(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.yml", "")
    assert resolve_config(MyConfig, {"batch_size": 2}, path) == resolve_config(MyConfig, {"batch_size": 2})


def test_later_sources_win(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yml", "batch_size: 20\nseed: 5\nmodel:\n  hidden: 100\n")
    config = resolve_config(
        MyConfig,
        MyConfig(batch_size=1, seed=1, warmup_steps=3),
        path,
        {"seed": 6, "model": {"depth": 4}},
        parse_override("model.hidden=64"),
    )
    assert config.batch_size == 20  # the file over the dataclass
    assert config.seed == 6  # the dict over the file
    assert config.warmup_steps == 3  # only the dataclass set it
    assert config.model == ModelConfig(hidden=64, depth=4)  # nested keys merge across sources


def test_earlier_sources_lose() -> None:
    config = resolve_config(MyConfig, {"batch_size": 1}, {"batch_size": 2}, {"batch_size": 3})
    assert config.batch_size == 3


def test_nested_override_keeps_sibling_keys() -> None:
    config = resolve_config(MyConfig, {"batch_size": 1, "model": {"hidden": 10, "depth": 11}}, {"model": {"depth": 1}})
    assert config.model == ModelConfig(hidden=10, depth=1)


def test_a_mapping_value_is_replaced_whole_by_every_later_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mapping-valued key (`compile`, `extra`) is a value: a later source replaces it whole, as jsonargparse does for
    a later file or `key=value` (only nested configs, dataclass fields, merge key by key). The script's own sources
    merged it, so `mode` survived there and was dropped on the command line."""
    assert resolve_config(MyConfig, {"batch_size": 1, "extra": {"a": 1, "b": 2}}, {"extra": {"c": 3}}).extra == {"c": 3}
    first, later = {"compile": {"mode": "max-autotune"}}, {"compile": {"fullgraph": True}}
    path = _write(tmp_path / "later.yml", "compile:\n  fullgraph: true\n")
    for configs, argv in (
        ((first, later), []),  # Two sources of the script.
        ((first,), [str(path)]),  # A file on the command line.
        ((first,), ["compile.fullgraph=true"]),  # A dotted key.
    ):
        with pytest.raises(SystemExit):
            BoringTask.launch(*configs, argv=[*argv, "in_dim=3", "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["model"]["config"]["compile"] == {"fullgraph": True}, argv


def test_overrides_read_values_as_yaml() -> None:
    config = resolve_config(
        MyConfig,
        {"batch_size": 1, "max_steps": 500},
        parse_override("betas=[0.5,0.6]"),
        parse_override("max_steps=null"),
        parse_override("precision=bf16-mixed"),
        parse_override("tags=[x, y]"),
    )
    assert config.betas == (0.5, 0.6)
    assert isinstance(config.betas, tuple)
    assert config.max_steps is None
    assert config.precision == "bf16-mixed"
    assert config.tags == ["x", "y"]


def test_bad_source_type_is_a_config_error() -> None:
    message = _error({"batch_size": 1}, 42)
    assert "42" in message
    assert "YAML file path" in message


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_suggests_close_match() -> None:
    message = _error({"batch_size": 1, "bach_size": 2})
    assert "unknown key 'bach_size'" in message
    assert "did you mean 'batch_size'?" in message
    assert "Invalid config for MyConfig (1 problem(s))" in message


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    message = _error({"batch_size": 1, "zzzzzz": 2})
    assert "unknown key 'zzzzzz'" in message
    assert "did you mean" not in message


def test_unknown_nested_key_uses_dotted_path() -> None:
    message = _error({"batch_size": 1}, parse_override("model.hiden=3"))
    assert "unknown key 'model.hiden'" in message
    assert "did you mean 'model.hidden'?" in message


def test_unknown_key_under_optional_nested_field_is_reported() -> None:
    @dataclass(kw_only=True)
    class C(mlfab.Config):
        model: ModelConfig | None = mlfab.field(None, help="The model")

    with pytest.raises(mlfab.ConfigError, match="model.hiden"):
        resolve_config(C, {"batch_size": 1, "model": {"hiden": 3}})


def test_unknown_nested_key_with_string_annotations_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = """\
        from __future__ import annotations

        from dataclasses import dataclass

        import mlfab


        @dataclass
        class Inner:
            hidden: int = 32


        @dataclass(kw_only=True)
        class FutureConfig(mlfab.Config):
            model: Inner = mlfab.field(Inner(), help="The model")
        """
    _write(tmp_path / "future_config_module.py", textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "future_config_module", raising=False)
    module = importlib.import_module("future_config_module")
    with pytest.raises(mlfab.ConfigError, match="model.hiden"):
        resolve_config(module.FutureConfig, {"batch_size": 1, "model": {"hiden": 3}})


def test_wrong_type_names_key_and_value() -> None:
    message = _error(parse_override("batch_size=abc"))
    assert "key 'batch_size'" in message
    assert "(got 'abc')" in message


def test_wrong_nested_type_names_dotted_key() -> None:
    message = _error({"batch_size": 1}, parse_override("model.depth=deep"))
    assert "key 'model.depth'" in message
    assert "(got 'deep')" in message


def test_wrong_literal_value_is_reported() -> None:
    message = _error({"batch_size": 1, "precision": "fp8"})
    assert "key 'precision'" in message
    assert "(got 'fp8')" in message
    assert "bf16-mixed" in message


def test_missing_required_key() -> None:
    message = _error({"seed": 1})
    assert "missing required key 'batch_size'" in message
    assert "batch_size=<value>" in message
    assert _problem_count(message) == 1


def test_all_problems_reported_together() -> None:
    message = _error({"bach_size": 1, "seed": "x", "model": {"hiden": 1, "depth": "y"}, "precision": "fp8"})
    problems = [line for line in message.splitlines() if line.startswith("  - ")]
    # bach_size unknown, batch_size missing, seed and model.depth not ints, model.hiden unknown, precision bad.
    assert _problem_count(message) == 6
    assert len(problems) == 6
    text = "\n".join(problems)
    for expected in ("'bach_size'", "'batch_size'", "'seed'", "'model.hiden'", "'model.depth'", "'precision'"):
        assert expected in text


def test_invalid_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.yml", "batch_size: [1, 2\nseed: 3\n")
    message = _error(path)
    assert str(path) in message
    assert "not valid YAML" in message


def test_yaml_list_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.yml", "- batch_size\n- 3\n")
    message = _error(path)
    assert str(path) in message
    assert "must hold a mapping" in message
    assert "list" in message


def test_missing_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    message = _error(path)
    assert str(path) in message
    assert "Cannot read config file" in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        resolve_config(MyConfig, {})


# ---------------------------------------------------------------------------------------------------------------------
# config_to_yaml


def test_config_to_yaml_round_trips(tmp_path: Path) -> None:
    config = resolve_config(
        MyConfig,
        {"batch_size": 7, "model": {"hidden": 3}, "tags": ["a", "b"], "extra": {"z": 26}},
        parse_override("betas=[0.5,0.6]"),
        parse_override("clip_grad_norm=null"),
        parse_override("precision=16-mixed"),
        parse_override("run_dir=/tmp/runs"),
    )
    text = config_to_yaml(config)
    path = _write(tmp_path / "config.yml", text)
    again = resolve_config(MyConfig, path)
    assert again == config
    assert again.betas == (0.5, 0.6)


def test_config_to_yaml_is_plain_yaml_in_field_order() -> None:
    config = MyConfig(batch_size=2, model=ModelConfig(hidden=1, depth=2))
    text = config_to_yaml(config)
    data = yaml.safe_load(text)
    assert list(data) == [f.name for f in dataclasses.fields(MyConfig)]
    assert data["batch_size"] == 2
    assert data["betas"] == [0.9, 0.999]
    assert data["model"] == {"hidden": 1, "depth": 2}
    assert data["max_steps"] is None


@dataclass(kw_only=True)
class InterpolatingConfig(mlfab.Config):
    batch_size: int = 4
    model_dir: str = mlfab.field("/models/large", help="Where the model lives")
    tokenizer_path: str = mlfab.field("${model_dir}/tok.json", help="An mlfab 0.2 (OmegaConf) interpolation")


def test_an_omegaconf_interpolation_is_refused_not_kept_as_text() -> None:
    """mlfab 0.2 resolved `${model_dir}` and `${oc.env:VAR}` in configs; the text reached the task as it was."""
    with pytest.raises(mlfab.ConfigError, match=r"key 'tokenizer_path': '\$\{model_dir\}/tok.json' is an OmegaConf"):
        resolve_config(InterpolatingConfig)
    with pytest.raises(mlfab.ConfigError, match=r"key 'model_dir': '\$\{oc.env:MODELS\}' is an OmegaConf"):
        resolve_config(InterpolatingConfig, {"model_dir": "${oc.env:MODELS}", "tokenizer_path": "/t.json"})


@dataclass(kw_only=True)
class ListConfig(mlfab.Config):
    batch_size: int = 4
    paths: list[str] = mlfab.field(["/data/a"], help="Data files")
    extra: dict[str, str] = mlfab.field({}, help="Named extras")


def test_an_interpolation_inside_a_list_or_mapping_is_refused_naming_its_place() -> None:
    """Only a string value was looked at: `paths=["${oc.env:HOME}/data"]` reached the task as that text."""
    given = {"paths": ["/ok", "${oc.env:HOME}/data"], "extra": {"k": "${oc.env:HOME}", "fine": "x"}}
    with pytest.raises(mlfab.ConfigError) as error:
        resolve_config(ListConfig, given)
    message = str(error.value)
    assert "key 'paths[1]': '${oc.env:HOME}/data' is an OmegaConf interpolation" in message
    assert "key 'extra.k': '${oc.env:HOME}' is an OmegaConf interpolation" in message
    assert "paths[0]" not in message and "extra.fine" not in message


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_it_and_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyYAML keeps the last of a key given twice, silently: the first `learning_rate` was ignored."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("learning_rate: 0.1\nmax_steps: 3\nlearning_rate: 0.5\n")
    run_file = tmp_path / "run.yaml"
    run_file.write_text("model:\n  config:\n    max_steps: 3\n    max_steps: 4\n")
    model_file = tmp_path / "model.yaml"  # LightningCLI's files of one section (`--model`, `--trainer`): not checked.
    model_file.write_text("config:\n  max_steps: 3\n  max_steps: 1\n")
    trainer_file = tmp_path / "trainer.yaml"
    trainer_file.write_text("max_steps: 3\nmax_steps: 1\n")
    runs = f"run_dir={tmp_path / 'runs'}"
    for argv in (
        [str(twice), runs],
        ["fit", f"--model.config={twice}"],
        ["fit", "--config", str(run_file)],
        ["fit", "--model", str(model_file)],
        ["fit", f"--trainer={trainer_file}"],
    ):
        with pytest.raises(mlfab.ConfigError, match=r"found the key '(learning_rate|max_steps)' twice: remove one"):
            BoringTask.launch(argv=argv)
    assert not (tmp_path / "runs").exists()
    shared = tmp_path / "shared.yaml"  # A merge key, then a key of the mapping's own, is no repeat.
    shared.write_text("slurm: &base {partition: gpu, time: '1:00:00'}\nextra: {<<: *base, partition: cpu}\n")
    assert mlfab.config.load_yaml(shared)["extra"] == {"partition": "cpu", "time": "1:00:00"}
    monkeypatch.setenv("MLFABRC_PATH", str(tmp_path / "rc.yml"))
    (tmp_path / "rc.yml").write_text("directories:\n  run: /a\n  run: /b\n")
    with pytest.raises(mlfab.SettingsError, match=r"found the key 'run' twice"):
        mlfab.get_run_dir()


@pytest.mark.parametrize(("strategy", "refused"), [("DDP", False), ("Auto", False), ("fsdp", False), ("dpp", True)])
def test_a_strategy_is_any_name_lightning_knows_in_any_case(strategy: str, refused: bool) -> None:
    """Lightning lowercases the name: `strategy=DDP` trained before the rule and was refused by its first version."""
    problems = mlfab.config.value_problems(mlfab.Config(batch_size=8, strategy=strategy))
    assert bool(problems) == refused, problems
