"""An mlfab task in a plain Lightning pipeline: your Trainer, a LightningDataModule, Lightning's own callbacks and
logger, then inference from the best checkpoint. Offline (scikit-learn's digits), about a minute on 2 CPU cores.

python -m examples.lightning_pipeline
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from examples.digits import Config, DigitsClassification, load_digits_split


class DigitsData(pl.LightningDataModule):
    """The digits as a LightningDataModule: it replaces the task's own `get_dataset` loaders."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _loader(self, phase: str, shuffle: bool = False) -> DataLoader:
        images, labels = load_digits_split("train" if phase == "train" else "valid", valid_fraction=0.2)
        data = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("valid")


class Digits(DigitsClassification):
    def get_prediction(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """`predict` gives the predicted class of each image (the default is the model's output for batch[0])."""
        images, _ = batch
        return self((images.float() / 255.0).unsqueeze(1)).argmax(-1)


def main(root: str = "runs/lightning_pipeline", max_epochs: int = 8, **trainer_kwargs: object) -> float:
    pl.seed_everything(0)
    task = Digits(Config())
    data = DigitsData(batch_size=task.config.batch_size)
    best = ModelCheckpoint(monitor="valid/loss/loss", save_top_k=2)  # mlfab's metric names: <phase>/<namespace>/<key>
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[
            best,
            EarlyStopping(monitor="valid/value/accuracy", mode="max", patience=3),
            LearningRateMonitor(logging_interval="step"),  # The warmup's rate, step by step.
        ],
        logger=CSVLogger(root),  # mlfab's values reach any Lightning logger; `self.log` values too.
        default_root_dir=root,
        log_every_n_steps=10,
        enable_progress_bar=False,
        **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(task, datamodule=data)
    (scores,) = trainer.validate(task, datamodule=data, ckpt_path="best", verbose=False)  # The file's weights.
    print(f"best checkpoint {best.best_model_path}: valid/loss/loss={scores['valid/loss/loss']:.4f}")

    model = Digits.load_from_checkpoint(best.best_model_path)  # Inference: the config comes from the checkpoint.
    predicted = torch.cat(trainer.predict(model, datamodule=data))  # type: ignore[arg-type]
    labels = torch.cat([y for _, y in data.predict_dataloader()])
    accuracy = float((predicted == labels).float().mean())
    print(f"held-out accuracy of the best checkpoint: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
