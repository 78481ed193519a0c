"""The one run pipeline, for `Task.launch`, `python -m my.task ...` and the `mlfab` script, whatever the subcommand:

1. `prepare_run`: one run directory agreed on by every rank, its `config.yaml`, the task's loggers;
2. `trainer_settings` (run/trainer.py): the Trainer arguments the config maps to, given `--trainer.*` over them;
3. `execute`: provenance and run info for the loggers, the Trainer call, and the exit code.

A Trainer the user builds (`lightning.pytorch.Trainer().fit(task)`) skips 1 and 3; the task's own hooks give it the
rest (data, optimizer, logging, checkpoint contents).
"""

import contextlib
import datetime
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from typing_extensions import override

from mlfab._lightning import SpawnedResult, StepFreeCallback, hidden_by_teardown
from mlfab.config import Config, config_to_yaml, show, to_dict
from mlfab.loggers.base import MlfabLogger
from mlfab.loggers.dispatch import write_run_info
from mlfab.run.callbacks import GracefulStop, PredictionWriter, signals_passed_to_spawned
from mlfab.run.distributed import EXP_DIR_ENV
from mlfab.run.invocation import command_name, current_command
from mlfab.run.provenance import atomic_write, launch_count, provenance_text, trained_before, write_provenance
from mlfab.run.quiet import hardware_line, install_quiet_start
from mlfab.run.rundir import RUN_FILE_HEADER, agreed_exp_dir, hold_run_dir, new_exp_dir
from mlfab.run.slurm import submit
from mlfab.run.trainer import trainer_kwargs

if TYPE_CHECKING:
    from mlfab.task import Task


@dataclass(frozen=True)
class Run:
    exp_dir: Path
    writer: bool  # Whether this process writes the run's files (rank zero does).
    created: bool  # Whether this launch made the directory (removed again if the launch fails before it starts).
    run_file: str  # The text of its config.yaml.
    subcommand: str = "fit"
    keeps_config: bool = False  # An evaluation logged into a trained run: its config.yaml stays the training's.


def run_file_text(task_cls: type, config: Config, trainer: dict[str, Any], path: Path, extra: dict[str, Any]) -> str:
    """`config.yaml` of a run, in LightningCLI's layout: the config in full and the Trainer arguments (and other
    top-level entries) given explicitly; a header says how to rerun it and lists the Trainer settings that followed
    from the config."""
    cmd, module = command_name(), task_cls.__module__
    if module == "__main__" and cmd.startswith("python -m "):
        module = cmd.removeprefix("python -m ")
    lines = [
        RUN_FILE_HEADER.format(task_cls.__qualname__),
        "# Train again with the same settings:",
    ]
    if cmd != "mlfab":
        lines += [f"#   {cmd} {path}", f"#   {cmd} fit --config {path}"]
    if module != "__main__" and "<locals>" not in task_cls.__qualname__:
        lines.append(f"#   mlfab fit --model {module}.{task_cls.__qualname__} --config {path}")
    lines.append("# Trainer settings that followed from model.config (a `trainer` entry overrides its setting):")
    lines += [f"#   {k}: {show(v)}" for k, v in trainer_kwargs(config).items() if k not in trainer]
    body = yaml.safe_dump({**extra, "model": {"config": to_dict(config)}, "trainer": trainer}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


def prepare_run(
    task: "Task", trainer: dict[str, Any], extra: dict[str, Any], set_loggers: bool = True, subcommand: str = "fit"
) -> Run:
    """The run directory (one for all ranks; its files are written once the run has started, see RunRecords) and
    the task's loggers. `validate` / `test` / `predict` of a run's checkpoint use that run's directory (the CLI sets
    `exp_dir`), and leave its config.yaml as training wrote it."""
    existed = _exists(task.config.exp_dir)
    exp_dir, writer = agreed_exp_dir(type(task), task.config)
    if writer and subcommand == "fit":
        hold_run_dir(exp_dir)
    install_quiet_start(exp_dir / "checkpoints")  # Before the Trainer is built: it prints tips and hardware lines.
    task._exp_dir = exp_dir
    with forgotten_if_refused(exp_dir, writer and not existed):
        if set_loggers:
            task.set_loggers()
        run_file = run_file_text(type(task), task.config, trainer, exp_dir / "config.yaml", extra)
    keeps_config = subcommand != "fit" and existed and (exp_dir / "config.yaml").is_file()
    return Run(exp_dir, writer, writer and not existed, run_file, subcommand, keeps_config)


def _exists(exp_dir: str | None) -> bool:
    return exp_dir is not None and Path(exp_dir).expanduser().exists()


@contextlib.contextmanager
def forgotten_if_refused(exp_dir: Path, created: bool) -> Iterator[None]:
    """A launch refused inside this block (bad Trainer arguments, a logger that fails, no sbatch) removes the run
    directory it made."""
    try:
        yield
    except BaseException:
        if created:
            forget_launch(exp_dir, True, set())
        raise


class RunRecords(StepFreeCallback):
    """Writes the run's files (`config.yaml`, the launch's provenance, the loggers' run information) when the work
    starts: after the config, the checkpoint and the data were accepted, so a refused relaunch leaves an existing
    run's records as they were."""

    def __init__(self, run: Run, task: "Task", resumed_from: Any) -> None:
        self.run, self.task, self.resumed_from, self.written = run, task, resumed_from, False

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Also `on_validation_start` (`validate`; in `fit` the records were written when training started),
        `on_test_start`, `on_predict_start` and `on_fit_end` (a relaunch of a finished run trains nothing; it is still
        a launch): the first of them writes the records. Only rank zero's: under a spawn-based strategy every started
        process has a copy of the launching process's `Run`, which writes."""
        run = self.run
        if self.written or not run.writer or not trainer.is_global_zero:
            return
        exp_dir, config_yaml = run.exp_dir, config_to_yaml(self.task.config)
        if run.subcommand == "fit" and trainer.ckpt_path is None and trained_before(exp_dir):
            # An earlier launch trained and left no checkpoint (it crashed before the first): this one starts over,
            # and what that one logged is superseded from step 0, as after a resume (before the run texts at step 0).
            print(f"Starting over at step 0: no earlier launch into {exp_dir} left a checkpoint.", flush=True)
            for logger in trainer.loggers:
                if isinstance(logger, MlfabLogger):
                    logger.resumed({"train": 0, "valid": 0})
        if not run.keeps_config:
            atomic_write(exp_dir / "config.yaml", run.run_file)
        write_provenance(
            exp_dir, type(self.task), resumed_from=self.resumed_from, config=run.run_file, subcommand=run.subcommand
        )
        write_run_info(trainer.loggers, config_yaml, provenance_text(exp_dir), exp_dir)
        self.written = True

    on_validation_start = on_test_start = on_predict_start = on_fit_end = on_train_start


def submit_to_slurm(task_cls: type, config: Config, args: list[str]) -> None:
    """Submits a Slurm job that runs `args` (Lightning-form arguments) with this program, in a new run directory."""
    existed = _exists(config.exp_dir)
    exp_dir = new_exp_dir(task_cls, config)
    with forgotten_if_refused(exp_dir, not existed):
        submit(
            config.slurm,
            exp_dir=exp_dir,
            command=current_command(args),
            workdir=Path.cwd(),
            devices=config.devices,
            num_nodes=config.num_nodes,
        )


def execute(trainer: Any, subcommand: str, task: "Task", run: Run, ckpt_path: Any = None, **kwargs: Any) -> int:
    """What every run does around the Trainer call: its records (once it has started), the run directory shared
    with the processes Lightning's DDP launcher starts, a signal turned into the exit code, and no empty run
    directory left behind by a launch that failed before it started. (The checkpoint is checked in
    `Task.on_load_checkpoint`.)"""
    exp_dir = run.exp_dir
    kept = set(exp_dir.rglob("*")) if run.writer and not run.created else set()
    launches = launch_count(exp_dir) if run.writer else 0
    records = RunRecords(run, task, resumed_from=ckpt_path if subcommand == "fit" else None)
    trainer.callbacks.append(records)
    if subcommand == "predict":  # Its outputs go to a file in the run directory (and are returned by Lightning).
        trainer.callbacks.append(PredictionWriter(exp_dir / "predictions"))
    spawned = SpawnedResult(outcome_of).install(trainer)  # Rank zero's, under a spawn-based strategy.
    if run.writer:
        print(f"Run directory: {exp_dir}", flush=True)
        print(hardware_line(trainer), flush=True)
        if ckpt_path is not None:
            print(f"Resuming from {ckpt_path}" if subcommand == "fit" else f"Weights from {ckpt_path}", flush=True)
        os.environ[EXP_DIR_ENV] = str(exp_dir)
    try:
        with signals_passed_to_spawned() if spawned.spawns else contextlib.nullcontext():
            getattr(trainer, subcommand)(task, ckpt_path=ckpt_path, **kwargs)
    except BaseException as e:
        # Under a spawn-based strategy rank zero's copy of `records` wrote them (see SpawnedResult): the new
        # launch entry says so.
        records.written = records.written or (run.writer and launch_count(exp_dir) > launches)
        if run.writer and not records.written:  # Refused before it started: the directory as it was.
            forget_launch(exp_dir, run.created, kept)
        if (original := hidden_by_teardown(e)) is not None:
            raise original from None
        raise
    finally:
        if run.writer:
            os.environ.pop(EXP_DIR_ENV, None)
    outcome = spawned.result or outcome_of(trainer)
    if run.writer:
        print(finish_text(trainer, subcommand, outcome, exp_dir), flush=True)
    # A signal that came once training had ended (during the final validation or checkpoint) stopped nothing.
    return 128 + outcome.stopped_by if outcome.stopped_by else 0


class Outcome(NamedTuple):
    """What a run's last lines and exit code say, as the process that did the work (rank zero) saw it."""

    step: int
    elapsed_time_s: float  # Training time.
    stopped_by: int | None  # The signal that stopped training.
    best: list[tuple[str, float, str]]  # (monitor, score, path) of each checkpoint callback with a monitor.


def outcome_of(trainer: Any) -> Outcome:
    """The `Outcome` of the work this process did with `trainer`."""
    task = trainer.lightning_module
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    best = [
        (str(c.monitor), float(c.best_model_score), str(c.best_model_path))
        for c in trainer.checkpoint_callbacks  # A ModelCheckpoint with a monitor other than mlfab's step count.
        if getattr(c, "monitor", None) not in (None, "step") and c.best_model_path and c.best_model_score is not None
    ]
    return Outcome(
        step=task.global_step,
        elapsed_time_s=task.elapsed_time_s,
        stopped_by=stop.signal_received if stop is not None and stop.signal_received and stop.stopping else None,
        best=best,
    )


def finish_text(trainer: Any, subcommand: str, outcome: Outcome, exp_dir: Path) -> str:
    """The run's last lines: where it ended (for `fit`, the step and the training time) and where its results are."""
    if subcommand != "fit":
        return f"Finished. Run directory: {exp_dir}"
    total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
    took = datetime.timedelta(seconds=round(outcome.elapsed_time_s))
    lines = [f"Finished at step {outcome.step}{total} after {took} of training. Run directory: {exp_dir}"]
    last = exp_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        lines.append(f"  last checkpoint: {last}")
    lines += [f"  best checkpoint ({monitor}={score:.6g}): {path}" for monitor, score, path in outcome.best]
    if outcome.stopped_by is not None and last.is_file():  # A command with `run_dir` would start a new run.
        lines.append(
            f"  stopped by {signal.Signals(outcome.stopped_by).name}: to go on from it, relaunch into this run "
            f"(exp_dir={exp_dir}, or --model.config.exp_dir in the fit form)"
        )
    return "\n".join(lines)


def forget_launch(exp_dir: Path, created: bool, kept: set[Path]) -> None:
    """Removes what a launch that failed before it started left in the run directory (e.g. the event file a
    TensorBoard logger opens when Lightning sets it up): all of it if the launch made the directory."""
    if created:
        shutil.rmtree(exp_dir, ignore_errors=True)
        return
    for path in sorted(set(exp_dir.rglob("*")) - kept, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
