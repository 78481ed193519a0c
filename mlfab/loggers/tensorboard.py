"""`mlfab.TensorboardLogger(exp_dir)`: event files under `<exp_dir>/tensorboard/{train,valid}`.

One directory per phase, so TensorBoard overlays the training and validation curves of the same tag.
It is Lightning's `TensorBoardLogger` (`experiment` is the training writer), so it works in any Trainer.
"""

import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from mlfab._lightning import file_writer, metric_prefix
from mlfab.loggers.base import MlfabLogger
from mlfab.logs.values import Logs, finite, free_tag
from mlfab.state import LogPhase, WritePhase


def verbatim(text: str) -> str:
    """`text` in a Markdown code block, which TensorBoard's text dashboard shows as written (it renders text as
    Markdown: newlines, indentation and `__init__`'s underscores would be lost). The fence is longer than any run
    of backticks in `text`, so a ``` inside it cannot close the block early."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}\n{text}\n{fence}"


def write_summaries(writer: Any, logs: Logs, prefix: str = "") -> None:
    """Writes every kind of `logs` to a torch SummaryWriter."""
    from torch.utils.tensorboard.summary import Summary

    step = logs.step
    for tag, value in logs.scalars.items():
        writer.add_scalar(prefix + tag, value, step)
    for tag, text in logs.of("string").items():
        writer.add_text(prefix + tag, verbatim(str(text)), step)
    for tag, image in logs.of("image").items():
        writer.add_image(prefix + tag, image, step, dataformats="HWC")
    for tag, audio in logs.of("audio").items():
        # Our own WAV, not `add_audio`: torch's takes mono only (it asserts a 1-D clip), while TensorBoard's audio
        # summary and its player take any channel count, so stereo stays stereo.
        clip = Summary.Audio(
            sample_rate=float(audio.sample_rate),
            num_channels=1 if audio.samples.ndim == 1 else audio.samples.shape[1],
            length_frames=audio.samples.shape[0],
            encoded_audio_string=audio.wav,
            content_type="audio/wav",
        )
        file_writer(writer).add_summary(Summary(value=[Summary.Value(tag=prefix + tag, audio=clip)]), step)
    for tag, video in logs.of("video").items():  # An animated image: beside an image of its name, `<tag>/video`.
        tag = free_tag(tag, "video", logs.of("image"))
        _, h, w, c = video.frames.shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=video.gif)
        file_writer(writer).add_summary(Summary(value=[Summary.Value(tag=prefix + tag, image=image)]), step)
    for tag, values in logs.of("histogram").items():
        if (values := finite(values)).size:  # An all-NaN histogram is skipped.
            writer.add_histogram(prefix + tag, values, step)
    for tag, cloud in logs.of("point_cloud").items():
        colors = None if cloud.colors is None else torch.from_numpy(cloud.colors).unsqueeze(0)
        writer.add_mesh(
            prefix + tag, vertices=torch.from_numpy(cloud.points).unsqueeze(0), colors=colors, global_step=step
        )


class TensorboardLogger(MlfabLogger, LightningTensorBoardLogger):
    def __init__(
        self,
        exp_dir: str | Path,
        log_interval_seconds: float | dict[LogPhase, float] = 2.0,
        flush_secs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir=str(exp_dir),
            name="tensorboard",
            version="",
            sub_dir="train",
            default_hp_metric=False,
            flush_secs=flush_secs,
            **kwargs,
        )
        self._set_interval(log_interval_seconds)
        self._flush_secs = flush_secs
        self._phase_writers: dict[str, Any] = {}

    def writer(self, phase: WritePhase) -> Any:
        if phase == "train":
            return self.experiment
        if phase not in self._phase_writers:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(self.log_dir).parent / phase
            self._phase_writers[phase] = SummaryWriter(str(path), flush_secs=self._flush_secs)
        return self._phase_writers[phase]

    def write(self, logs: Logs) -> None:
        write_summaries(self.writer(logs.phase), logs, metric_prefix(self))

    @override
    def resumed(self, steps: dict[LogPhase, int]) -> None:
        """TensorBoard's restart marker (what `SummaryWriter(purge_step=N)` writes), in each phase's events: its
        reader drops the earlier launch's events of that step and after, so each step shows once."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        for phase, step in steps.items():
            file_writer(self.writer(phase)).add_event(Event(session_log=SessionLog(status=SessionLog.START)), step)

    def write_run_info(self, info: dict[str, str]) -> None:
        for name, text in info.items():
            self.experiment.add_text(f"{metric_prefix(self)}run/{name}", verbatim(text), 0)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        for w in self._phase_writers.values():
            w.close()  # Flushes first.
        self._phase_writers = {}
