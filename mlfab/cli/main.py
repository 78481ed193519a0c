"""The `mlfab` console script: `mlfab fit --model package.module.TaskClass ...`, for any task by import path."""

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from mlfab.cli.args import SUBCOMMANDS
from mlfab.cli.parser import run_cli, user_errors_exit
from mlfab.task import Task

USAGE = f"""usage: mlfab {{{",".join(SUBCOMMANDS)}}} --model package.module.TaskClass [--help] [ARGS ...]

Runs Lightning's CLI for any mlfab task, given by import path (the working directory is importable, as with
`python -m`). The arguments are those of `python -m package.module {{fit,...}}`, e.g.

  mlfab fit --model examples.digits.DigitsClassification --model.config.max_steps 200
  mlfab fit --model examples.digits.DigitsClassification --help
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The `mlfab` console script. Run as the program (`argv` None), a user error (`mlfab.MlfabError`) ends it with
    `error: <message>` and exit status 2 or 1, as `Task.launch` does (see `mlfab.cli.parser.launch`); with `argv`
    given, it is raised."""
    if argv is None:
        with user_errors_exit():
            return main(sys.argv[1:])
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    try:
        if args[0] not in SUBCOMMANDS:
            raise ValueError(f"unknown subcommand {args[0]!r}: expected one of {', '.join(SUBCOMMANDS)}")
        task_cls, rest = _take_task(args)
    except ValueError as e:
        print(f"{USAGE}\nmlfab: error: {e}", file=sys.stderr)
        return 2
    return run_cli(task_cls, rest)


def _take_task(args: list[str]) -> tuple[type[Task], list[str]]:
    """The task named by `--model package.module.Class` (or `module:Class`) and the other arguments."""
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            value, rest = args[i + 1], args[:i] + args[i + 2 :]
        elif arg.startswith("--model="):
            value, rest = arg.partition("=")[2], args[:i] + args[i + 1 :]
        else:
            continue
        if not Path(value).exists():  # `--model FILE` is Lightning's: a config file of model arguments.
            return import_task(value), rest
    raise ValueError("which task? Name it by import path: --model package.module.TaskClass")


def import_task(path: str) -> type[Task]:
    module_name, _, name = path.replace(":", ".").rpartition(".")
    if not module_name or not name:
        raise ValueError(f"--model {path}: expected an import path such as examples.mnist.MnistClassification")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # As `python -m` does, so tasks in the working directory import.
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"--model {path}: cannot import {module_name} ({e}). Run mlfab from the directory that "
            "holds the package, or install it."
        ) from e
    task = getattr(module, name, None)
    if not (isinstance(task, type) and issubclass(task, Task)):
        tasks = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Task) and v is not Task]
        known = f"; tasks in {module_name}: {', '.join(tasks)}" if tasks else f"; {module_name} defines no Task"
        raise ValueError(f"--model {path}: {name} is not an mlfab.Task subclass{known}")
    return task
