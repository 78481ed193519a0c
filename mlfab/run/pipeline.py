"""The one run pipeline, for `Task.launch`, `python -m my.task ...` and the `mlfab` script, whatever the subcommand:

1. `prepare_run`: one run directory agreed on by every rank, its `config.yaml`, the task's loggers;
2. `trainer_settings` (run/trainer.py): the Trainer arguments the config maps to, given `--trainer.*` over them;
3. `execute`: provenance and run info for the loggers, the Trainer call, and the exit code.

A Trainer the user builds (`lightning.pytorch.Trainer().fit(task)`) skips 1 and 3; the task's own hooks give it the
rest (data, optimizer, logging, checkpoint contents).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mlfab.config import Config, config_to_yaml, to_dict
from mlfab.loggers.dispatch import write_run_info
from mlfab.run.callbacks import GracefulStop
from mlfab.run.distributed import EXP_DIR_ENV
from mlfab.run.invocation import command_name, current_command
from mlfab.run.provenance import provenance_text, write_provenance
from mlfab.run.rundir import agreed_exp_dir, new_exp_dir
from mlfab.run.slurm import submit
from mlfab.run.trainer import trainer_kwargs

if TYPE_CHECKING:
    from mlfab.task import Task


@dataclass(frozen=True)
class Run:
    exp_dir: Path
    writer: bool  # Whether this process writes the run's files (rank zero does).


def show(value: Any) -> str:
    """A value as it is typed on the command line (YAML): null, [0.9, 0.999], auto."""
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    except yaml.YAMLError:
        return repr(value)


def run_file_text(task_cls: type, config: Config, trainer: dict[str, Any], path: Path, extra: dict[str, Any]) -> str:
    """`config.yaml` of a run, in LightningCLI's layout: the config in full and the Trainer arguments (and other
    top-level entries) given explicitly; a header says how to rerun it and lists the Trainer settings that followed
    from the config."""
    cmd, module = command_name(), task_cls.__module__
    if module == "__main__" and cmd.startswith("python -m "):
        module = cmd.removeprefix("python -m ")
    lines = [
        f"# mlfab run config of {task_cls.__qualname__}: the config and the Trainer arguments given explicitly.",
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


def prepare_run(task: "Task", trainer: dict[str, Any], extra: dict[str, Any], set_loggers: bool = True) -> Run:
    """The run directory (one for all ranks) with its `config.yaml`; the task's loggers attached."""
    exp_dir, writer = agreed_exp_dir(type(task), task.config)
    if writer:
        path = exp_dir / "config.yaml"
        path.write_text(run_file_text(type(task), task.config, trainer, path, extra))
    task._exp_dir = exp_dir
    if set_loggers:
        task.set_loggers()
    return Run(exp_dir, writer)


def submit_to_slurm(task_cls: type, config: Config, args: list[str]) -> None:
    """Submits a Slurm job that runs `args` (Lightning-form arguments) with this program, in a new run directory."""
    submit(config.slurm, exp_dir=new_exp_dir(task_cls, config), command=current_command(args), workdir=Path.cwd())


def execute(trainer: Any, subcommand: str, task: "Task", run: Run, ckpt_path: Any = None, **kwargs: Any) -> int:
    """What every run does around the Trainer call: record provenance, give the loggers the run's config and origin,
    share the run directory with the processes Lightning's DDP launcher starts, and turn a signal into the exit code.
    (The checkpoint is checked in `Task.on_load_checkpoint`.)"""
    exp_dir = run.exp_dir
    if run.writer:
        write_provenance(exp_dir, type(task), resumed=subcommand == "fit" and ckpt_path is not None)
        write_run_info(trainer.loggers, config_to_yaml(task.config), provenance_text(exp_dir), exp_dir)
        print(f"Run directory: {exp_dir}", flush=True)
        if ckpt_path is not None:
            print(f"Resuming from {ckpt_path}" if subcommand == "fit" else f"Weights from {ckpt_path}", flush=True)
        os.environ[EXP_DIR_ENV] = str(exp_dir)
    try:
        getattr(trainer, subcommand)(task, ckpt_path=ckpt_path, **kwargs)
    finally:
        if run.writer:
            os.environ.pop(EXP_DIR_ENV, None)
    if run.writer:
        print(f"Finished. Run directory: {exp_dir}", flush=True)
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    return 128 + stop.signal_received if stop is not None and stop.signal_received else 0
