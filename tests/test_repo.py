"""The project's promises about itself: public surface, README commands, the seed example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlfab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_public_surface_is_exactly_what_is_meant() -> None:
    assert sorted(mlfab.__all__) == sorted(
        [
            "CheckpointError",
            "Config",
            "ConfigError",
            "DatasetError",
            "JsonLogger",
            "MlfabError",
            "MlfabLogger",
            "NonFiniteError",
            "Phase",
            "PlainLogger",
            "SettingsError",
            "SlurmError",
            "State",
            "StdoutLogger",
            "Task",
            "TaskDefinitionError",
            "TensorboardLogger",
            "WandbLogger",
            "detached_call",
            "field",
            "get_data_dir",
            "get_pretrained_models_dir",
            "get_run_dir",
            "worker_shard",
        ]
    )
    assert all(hasattr(mlfab, name) for name in mlfab.__all__)


@pytest.mark.integration
def test_import_does_no_work_beyond_defining_names(tmp_path: Path) -> None:
    code = "import sys, mlfab; print('wandb' in sys.modules, 'moviepy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "MLFABRC_PATH": str(tmp_path / "rc.yml")},
        cwd=tmp_path,
        check=True,
    )
    assert out.stdout.split() == ["False", "False"]
    assert not (tmp_path / "rc.yml").exists()  # Settings are written on first use, not at import.


@pytest.mark.unit
def test_readme_has_two_setup_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    assert commands[0].endswith("python -m examples.digits")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.unit
def test_seed_example_is_unchanged() -> None:
    source = (ROOT / "examples" / "mnist.py").read_text()
    for line in [
        "class MnistClassification(mlfab.Task[Config]):",
        '        self.log_labeled_images("images", lambda: (x_bhw, get_label_strings()))',
        "    MnistClassification.launch(Config(batch_size=16))",
        '        root_dir = mlfab.get_data_dir() / "mnist"',
    ]:
        assert line in source
    # The seed README sits in shared/ beside the clone (development and CI), or inside it where shared/ was copied in.
    places = [root / "shared" / "seed" / "mlfab-README.md" for root in (ROOT.parent, ROOT)]
    seed = next((path for path in places if path.is_file()), None)
    assert seed is not None, "the seed README is missing; looked for " + " and ".join(map(str, places))
    block = seed.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert source == block, f"examples/mnist.py differs from the example in {seed}"
