"""`mlfab.TensorboardLogger(exp_dir)`: event files under `<exp_dir>/tensorboard/{train,valid}`.

One directory per phase, so TensorBoard overlays the training and validation curves of the same tag.
It is Lightning's `TensorBoardLogger` (`experiment` is the training writer), so it works in any Trainer.
"""

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlfab.logbuffer import Logs
from mlfab.loggers.base import MlfabLogger
from mlfab.state import Phase


class TensorboardLogger(MlfabLogger, LightningTensorBoardLogger):
    def __init__(
        self,
        exp_dir: str | Path,
        log_interval_seconds: float | dict[Phase, float] = 2.0,
        flush_secs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir=str(exp_dir), name="tensorboard", version="", sub_dir="train",
            default_hp_metric=False, flush_secs=flush_secs, **kwargs,
        )
        self._set_interval(log_interval_seconds)
        self._flush_secs = flush_secs
        self._phase_writers: dict[str, Any] = {}

    def writer(self, phase: Phase) -> Any:
        if phase == "train":
            return self.experiment
        if phase not in self._phase_writers:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(self.log_dir).parent / phase
            self._phase_writers[phase] = SummaryWriter(str(path), flush_secs=self._flush_secs)
        return self._phase_writers[phase]

    def write(self, logs: Logs) -> None:
        w = self.writer(logs.phase)
        for tag, value in logs.scalars.items():
            w.add_scalar(tag, value, logs.step)
        for tag, text in logs.of("string").items():
            w.add_text(tag, text, logs.step)
        for tag, image in logs.of("image").items():
            w.add_image(tag, image, logs.step, dataformats="HWC")

    def write_config(self, config_yaml: str) -> None:
        self.experiment.add_text("config", f"```yaml\n{config_yaml}\n```", 0)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        for w in self._phase_writers.values():
            w.flush()
            w.close()
        self._phase_writers = {}
