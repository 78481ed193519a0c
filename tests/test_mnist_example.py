"""The seed README's MNIST example, unchanged, on small IDX files run through dpshdl's real loader."""

from pathlib import Path

import numpy as np
import pytest

import mlfab
from examples.mnist import Config, MnistClassification
from mlfab.testing import read_images, read_scalars, write_idx_mnist


@pytest.mark.integration
def test_seed_mnist_trains_and_logs_loss_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    # The seed passes root_dir=<data>/mnist and dpshdl adds its own "mnist" folder.
    write_idx_mnist(data / "mnist" / "mnist", num_train=256, num_test=64)
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))

    argv = ["max_steps=40", "valid_every_n_steps=20", "valid_batches=2"]
    MnistClassification.launch(Config(batch_size=16), argv=argv)

    (exp,) = (tmp_path / "runs" / "mnist_classification").iterdir()
    valid = read_scalars(exp / "tensorboard" / "valid")["loss/loss"]
    assert [step for step, _ in valid] == [1, 20, 40]
    assert valid[-1][1] < valid[0][1]
    assert "loss/loss" in read_scalars(exp / "tensorboard" / "train")

    images = read_images(exp / "tensorboard" / "valid")["value/images"]
    assert [step for step, _ in images] == [1, 20, 40]
    picture = images[-1][1]
    assert picture.ndim == 3 and picture.shape[2] == 3
    # 16 captioned digits, laid out for TensorBoard's wide image card (6 columns of 3 rows): wider than tall.
    assert picture.shape[1] > picture.shape[0] > 200
    assert (exp / "checkpoints" / "last.ckpt").is_file()

    # The example has no get_prediction: the default feeds the model the loader's raw uint8 images, and the error
    # says which hook prepares them (it was a bare 100-line traceback).
    with pytest.raises(RuntimeError) as info:
        MnistClassification.launch(Config(batch_size=16), argv=["predict", f"--model.config.exp_dir={exp}"])
    assert "override MnistClassification.get_prediction(batch) to prepare the batch" in " ".join(info.value.__notes__)


@pytest.mark.integration
def test_missing_mnist_says_which_files_to_place_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    with pytest.raises(mlfab.DatasetError) as info:
        MnistClassification.launch(Config(batch_size=16), argv=["max_steps=1"])
    message = str(info.value)
    expected = tmp_path / "data" / "mnist" / "mnist" / "train-images-idx3-ubyte.gz"
    assert "get_dataset('train') could not download" in message
    assert f"place it at:\n    {expected}" in message


@pytest.mark.integration
def test_unset_data_dir_names_the_setting_and_variable(tmp_path: Path) -> None:
    with pytest.raises(mlfab.SettingsError, match=r"directories.data.*DATA_DIR"):
        MnistClassification.launch(Config(batch_size=16), argv=[f"run_dir={tmp_path / 'runs'}"])


@pytest.mark.unit
def test_idx_files_load_with_dpshdl(tmp_path: Path) -> None:
    from dpshdl.impl.mnist import MNIST

    write_idx_mnist(tmp_path / "mnist", num_train=20, num_test=10)
    ds = MNIST(train=False, root_dir=tmp_path)
    assert ds.images.shape == (10, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (10,)
