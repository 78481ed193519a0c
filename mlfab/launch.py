"""`Task.launch`: resolve the config, make the run directory, build the Lightning Trainer, and fit.

Command line (mlfab style): `python -m examples.mnist [config.yaml ...] [key=value ...] [--help]`.
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlfab.config import Config, config_to_yaml, parse_override, resolve_config
from mlfab.errors import ConfigError
from mlfab.rundir import agreed_exp_dir, new_exp_dir, newest_checkpoint, snake_case
from mlfab.trainer import build_trainer, trainer_callbacks, trainer_kwargs, trainer_settings

__all__ = [
    "agreed_exp_dir",
    "build_trainer",
    "execute",
    "launch",
    "new_exp_dir",
    "newest_checkpoint",
    "run",
    "snake_case",
    "trainer_callbacks",
    "trainer_kwargs",
    "trainer_settings",
]

if TYPE_CHECKING:
    from mlfab.task import Task

# A first argument naming one of these runs Lightning's CLI (mlfab.cli) instead of the mlfab form.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def command_name() -> str:
    """How the user started this program, for messages: `python -m examples.mnist` or `python train.py`."""
    if Path(sys.argv[0]).name == "mlfab":
        return "mlfab"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {Path(sys.argv[0]).name}" if sys.argv and sys.argv[0] else "python my_script.py"


def _show(value: Any) -> str:
    """A value as it is typed on the command line (YAML): null, [0.9, 0.999], auto."""
    import yaml

    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
    except yaml.YAMLError:
        return repr(value)


def _help_rows(cls: type, script: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """`name (type, default: ...)` and the help text of every field, nested dataclass fields by dotted name. The
    default is the script's (class defaults <- what it gives `launch`); `current` also has the arguments applied."""
    from dataclasses import MISSING, fields

    from mlfab.config import _dataclass_type, _field_types, field_help, merge, type_name

    rows = []
    for f in fields(cls):
        tp, name = _field_types(cls)[f.name], prefix + f.name
        default, value = script.get(f.name, MISSING), current.get(f.name, MISSING)
        sub = _dataclass_type(tp)
        if sub is not None and (value is MISSING or isinstance(value, dict)):
            sub_script = merge(_defaults(sub), default if isinstance(default, dict) else {})
            rows += _help_rows(sub, sub_script, merge(sub_script, value or {}), f"{name}.")  # type: ignore[arg-type]
            continue
        was = "required" if default is MISSING else f"default: {_show(default)}"
        shown = was if value == default else f"{was}, current: {_show(value)}"
        rows.append(f"  {name} ({type_name(tp)}, {shown})\n      {field_help(f)}")
    return rows


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults as plain data; required fields left out."""
    from dataclasses import MISSING, fields

    from mlfab.config import to_dict

    values = {
        f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        for f in fields(cls)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    return to_dict(values)


def print_help(task_cls: type["Task"], configs: Sequence[Any] = (), argv: Sequence[str] = ()) -> None:
    """Every config key with its type, value and help text: the values after `configs` (what the script passes to
    `launch`) and the command-line arguments `argv` are applied."""
    from mlfab.config import merge, merge_sources

    cls = task_cls.config_class()
    script = merge(_defaults(cls), merge_sources(cls, *configs))
    current = merge(script, merge_sources(cls, *parse_argv(task_cls, list(argv))))
    cmd = command_name()
    print(
        f"usage: {cmd} [config.yaml ...] [key=value ...]\n"
        f"       {cmd} {{fit,validate,test,predict}} [--help] ...   (Lightning's CLI, see its --help)\n"
    )
    print(
        f"Trains {task_cls.__name__}. The arguments apply in order, later ones winning, over the defaults shown: "
        "YAML files (a bare file name is also looked up next to the task's source file) and key=value (the value "
        "is read as YAML, so betas=[0.9,0.95] and max_steps=null work; dotted keys set nested fields).\n"
    )
    print("config keys:")
    print("\n".join(_help_rows(cls, script, current, "")))


def parse_argv(task_cls: type["Task"], argv: list[str]) -> list[Any]:
    """YAML paths and key=value overrides, in order. A bare file name is also found next to the task's source."""
    import inspect

    sources: list[Any] = []
    for arg in argv:
        if arg.startswith("-"):
            key = arg.lstrip("-").partition("=")[0]
            raise ConfigError(
                f"Unknown option {arg!r}: this form takes YAML files and key=value arguments (e.g. {key}=...). "
                f"Flags such as --model.config.{key} and --trainer.{key} need a subcommand first, as in "
                f"`{command_name()} fit --model.config.{key} ...`; see `{command_name()} --help`."
            )
        if "=" in arg:
            sources.append(parse_override(arg))
            continue
        path = Path(arg)
        if not path.exists():
            try:
                beside = Path(inspect.getfile(task_cls)).parent / arg
            except (TypeError, OSError):
                beside = path
            if beside.exists():
                path = beside
            else:
                raise ConfigError(
                    f"Config file {arg!r} not found (looked in the working directory and next to "
                    f"{task_cls.__name__}'s source file). Pass key=value or an existing YAML file."
                )
        sources.append(path)
    return sources


def launch(task_cls: type["Task"], *configs: Any, launcher: Any = None, argv: list[str] | None = None) -> None:
    """`argv` (default: the command line) in the mlfab form, or Lightning's CLI when it starts with a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if launcher not in (None, "auto", "local", "slurm"):
        raise ConfigError(
            f"Unknown launcher {launcher!r}: use None (train here, on the devices the config asks "
            "for; torchrun and multi-node environments are detected) or 'slurm'."
        )
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from mlfab.cli import run_cli  # Imports LightningCLI and jsonargparse: only when asked for.
        from mlfab.slurm import in_slurm_job

        if launcher == "slurm" and not in_slurm_job():
            raise ConfigError(
                f"launcher='slurm' submits launches in the mlfab form (key=value arguments), not the "
                f"Lightning form ({argv[0]} ...): run `{command_name()} key=value ...` to submit, or "
                "submit your own sbatch script that runs this command."
            )

        code = run_cli(task_cls, argv, configs)
    elif "--help" in argv or "-h" in argv:
        print_help(task_cls, configs, [a for a in argv if a not in ("--help", "-h")])
        raise SystemExit(0)
    else:
        config = resolve_config(task_cls.config_class(), *configs, *parse_argv(task_cls, argv))
        code = submit_or_run(task_cls, config, launcher, argv)
    if code:
        raise SystemExit(code)


def submit_or_run(task_cls: type["Task"], config: Config, launcher: Any, argv: list[str]) -> int:
    """`launcher="slurm"` on a login node submits a job that runs this same command; anything else trains here."""
    from mlfab.slurm import current_command, in_slurm_job, submit

    if launcher == "slurm" and not in_slurm_job():
        submit(config.slurm, exp_dir=new_exp_dir(task_cls, config), command=current_command(argv), workdir=Path.cwd())
        return 0
    return run(task_cls, config)


def run_file_text(
    task_cls: type, config: Config, trainer: dict[str, Any], path: Path, extra: dict[str, Any] | None = None
) -> str:
    """`config.yaml` of a run: LightningCLI's layout (so both `fit --config` and the mlfab form read it), the config
    in full and the Trainer arguments given explicitly; a header says how to rerun it and lists the Trainer
    settings that followed from the config."""
    import yaml

    from mlfab.config import to_dict

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
    lines += [f"#   {k}: {_show(v)}" for k, v in trainer_kwargs(config).items() if k not in trainer]
    body = yaml.safe_dump({**(extra or {}), "model": {"config": to_dict(config)}, "trainer": trainer}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


def run(task_cls: type["Task"], config: Config) -> int:
    """Trains `task_cls` with a resolved config, resuming from the run directory's newest checkpoint if it has
    one; returns the process exit code (128 + the signal number after Ctrl-C or SIGTERM)."""
    import lightning.pytorch as pl

    pl.seed_everything(config.seed, workers=True, verbose=False)
    exp_dir, writer = agreed_exp_dir(task_cls, config)
    if writer:
        (exp_dir / "config.yaml").write_text(run_file_text(task_cls, config, {}, exp_dir / "config.yaml"))
    task = task_cls(config)
    task._exp_dir = exp_dir
    task.set_loggers()
    trainer = build_trainer(config, exp_dir, task._mlfab_loggers)
    return execute(trainer, "fit", task, exp_dir=exp_dir, writer=writer, ckpt_path=newest_checkpoint(exp_dir))


def execute(
    trainer: Any, subcommand: str, task: "Task", *, exp_dir: Path, writer: bool, ckpt_path: Any = None, **kwargs: Any
) -> int:
    """What every run does around the Trainer call, in both command-line forms: record provenance, give the
    loggers the run's config and origin, share the run directory with the processes Lightning's DDP launcher
    starts, and turn a signal into the exit code. (The checkpoint is checked in `Task.on_load_checkpoint`.)"""
    from mlfab.callbacks import GracefulStop
    from mlfab.distributed import EXP_DIR_ENV
    from mlfab.loggers.dispatch import write_run_info
    from mlfab.provenance import provenance_text, write_provenance

    if writer:
        write_provenance(exp_dir, type(task), resumed=subcommand == "fit" and ckpt_path is not None)
        write_run_info(trainer.loggers, config_to_yaml(task.config), provenance_text(exp_dir), exp_dir)
        print(f"Run directory: {exp_dir}", flush=True)
        if ckpt_path is not None:
            print(f"Resuming from {ckpt_path}" if subcommand == "fit" else f"Weights from {ckpt_path}", flush=True)
        os.environ[EXP_DIR_ENV] = str(exp_dir)
    try:
        getattr(trainer, subcommand)(task, ckpt_path=ckpt_path, **kwargs)
    finally:
        if writer:
            os.environ.pop(EXP_DIR_ENV, None)
    if writer:
        print(f"Finished. Run directory: {exp_dir}", flush=True)
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    return 128 + stop.signal_received if stop is not None and stop.signal_received else 0
