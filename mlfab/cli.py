"""Lightning's CLI for mlfab tasks: `python -m my.task fit ...` (through `Task.launch`) and the `mlfab` script.

    python -m examples.digits fit --model.config.max_steps 200 --trainer.max_time 00:00:10:00
    python -m examples.digits fit --config runs/digits_classification/run_0/config.yaml
    mlfab fit --model examples.mnist.MnistClassification --model.config.batch_size 16

LightningCLI parses; the run is `Task.launch`'s: run directory, config.yaml, loggers, callbacks, Trainer settings.
"""

import difflib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mlfab import config as mlfab_config
from mlfab.config import build_config, field_help, merge_sources, to_dict
from mlfab.errors import ConfigError
from mlfab.launch import (
    LIGHTNING_SUBCOMMANDS,
    agreed_exp_dir,
    command_name,
    execute,
    newest_checkpoint,
    run_file_text,
    trainer_settings,
)

PRECEDENCE = (
    "Config values, later winning: the Config class defaults, the script's launch() config, the checkpoint's config "
    "(--ckpt_path), then --config files and --model.config.* flags in the order given, so values you give are never "
    "replaced by the checkpoint's. A --trainer.* argument given (as a flag or in a --config file) wins over the "
    "Trainer setting mlfab derives from the config. --print_config prints the run in config.yaml's layout."
)
DESCRIPTIONS = {
    "fit": "Trains the task as Task.launch does (run directory, config.yaml, loggers, callbacks, Trainer settings).",
    "validate": "Runs one validation (valid_batches batches of get_dataset('valid')) in a new run directory.",
    "test": "Runs get_dataset('test'), or 'valid' when it returns None for 'test', in a new run directory: all of "
    "it, or valid_batches batches of an endless dataset.",
    "predict": "Runs Lightning's predict loop (the task must define predict_dataloader and predict_step).",
}


class MlfabArgumentParser(LightningArgumentParser):
    """Lightning's parser; an unrecognized flag also gets the closest known flags as suggestions."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if message.startswith("unrecognized arguments:"):
            parser = getattr(ex, "subcommand_parser", None) or self
            known = [o for o in parser._option_string_actions if o.startswith("--")]
            for token in message.partition(":")[2].split():
                close = difflib.get_close_matches(token.partition("=")[0], known, n=3, cutoff=0.8)
                if token.startswith("--") and close:
                    message += f"\n  {token}: did you mean {' or '.join(close)}?"
        super().error(message, ex)


class MlfabCLI(LightningCLI):
    """LightningCLI with mlfab's run: see the module docstring, and `PRECEDENCE` for which value wins."""

    def __init__(self, task_cls: type, args: list[str], script_config: dict[str, Any]) -> None:
        self.task_cls, self.script_config, self.exit_code = task_cls, script_config, 0
        # --print_config is answered here, after the checkpoint's config is merged, in config.yaml's layout.
        rest = [a for a in args[1:] if a.partition("=")[0] != "--print_config"]
        self.print_run_file, args = len(rest) < len(args) - 1, args[:1] + rest
        kwargs = {sub: {"description": f"{text} {PRECEDENCE}"} for sub, text in DESCRIPTIONS.items()}
        super().__init__(
            task_cls,
            args=args,
            save_config_callback=None,
            seed_everything_default=False,
            load_from_checkpoint_support=False,
            parser_class=MlfabArgumentParser,
            parser_kwargs={"prog": command_name(), **kwargs},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """`mlfab.field(help=...)` as the help of each `--model.config.*` flag; the script's config as defaults."""
        cls = self.task_cls.config_class()
        for action in parser._actions:
            if action.dest.startswith("model.config."):
                help_text = _field_help(cls, action.dest.split(".")[2:])
                action.help = help_text or action.help
        defaults = _flatten(cls, self.script_config, "model.config.")
        if defaults:
            parser.set_defaults(defaults)
            for action in parser._actions:
                if action.dest in defaults:  # A field the class requires but the script sets.
                    action.required = False

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.config = parser.parse_args(args)
        # The same arguments without defaults: what the user gave (flags and --config files), which must win.
        self.given = parser.parse_args(args, defaults=False)

    def given_keys(self) -> list[str]:  # Dotted: "model.config.batch_size", "trainer.max_steps", "ckpt_path", ...
        return list(self.given[self.config.subcommand].keys()) if self.given.get(self.config.subcommand) else []

    def before_instantiate_classes(self) -> None:
        sub = self.config.subcommand
        cfg = self.config[sub]
        for key in self.given_keys():
            if key.startswith("model."):  # Lightning put the checkpoint's config over everything; undo that for these.
                cfg[key] = self.given[sub][key]
        if "seed_everything" in self.given_keys() and cfg.get("seed_everything") not in (None, False):
            cfg["model.config.seed"] = int(cfg["seed_everything"])  # Lightning seeded with it; so must the run.
        config = build_config(self.task_cls.config_class(), cfg["model.config"].as_dict())
        if self.print_run_file:
            trainer, extra = self.given_sections(with_ckpt=True)
            print(yaml.safe_dump({**extra, "model": {"config": to_dict(config)}, "trainer": trainer}, sort_keys=False))
            raise SystemExit(0)
        pl.seed_everything(config.seed, workers=True, verbose=False)

    def given_sections(self, with_ckpt: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Trainer arguments given, and the other given top-level entries (optimizer, data, ...), as plain data."""
        sub = self.config.subcommand
        dump = yaml.safe_load(self._parser(sub).dump(self.config[sub])) or {}
        keys = self.given_keys()
        trainer = {
            k: (dump.get("trainer") or {}).get(k)
            for k in dict.fromkeys(k.split(".")[1] for k in keys if k.startswith("trainer."))
        }
        skip = {"config", "model", "trainer", "seed_everything", *(() if with_ckpt else ("ckpt_path", "weights_only"))}
        extra = {k: dump.get(k) for k in dict.fromkeys(k.split(".")[0] for k in keys) if k not in skip}
        return trainer, extra

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """mlfab's Trainer for the config (as `build_trainer` makes it), the `--trainer.*` arguments given over it."""
        task, config = self.model, self.model.config
        exp_dir, self.writer = agreed_exp_dir(type(task), config)  # One run directory for all ranks.
        self.exp_dir = exp_dir
        trainer_given, extra = self.given_sections(with_ckpt=False)
        if self.writer:
            (exp_dir / "config.yaml").write_text(
                run_file_text(type(task), config, trainer_given, exp_dir / "config.yaml", extra)
            )
        task._exp_dir = exp_dir
        values = self._get(self.config_init, "trainer", default={})
        if "logger" in trainer_given:
            loggers = values["logger"]
        else:
            task.set_loggers()
            loggers = task._mlfab_loggers
        extra_callbacks = [
            *[self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys],
            *(_as_list(values.get("callbacks")) if "callbacks" in trainer_given else []),
        ]
        extra_plugins = _as_list(values.get("plugins")) if "plugins" in trainer_given else []
        settings = {**values, **trainer_settings(config, exp_dir, loggers, extra_callbacks, extra_plugins)}
        for key in trainer_given:
            if key not in ("logger", "callbacks", "plugins"):
                settings[key] = values[key]
        return self.trainer_class(**{**settings, **kwargs})

    def _mlfab_run(self, subcommand: str, model: Any, kwargs: dict[str, Any]) -> None:
        """`launch`'s run, for any subcommand: a fit into a run directory with checkpoints resumes from them."""
        if subcommand == "fit" and kwargs.get("ckpt_path") is None:
            kwargs["ckpt_path"] = newest_checkpoint(self.exp_dir)
        self.exit_code = execute(self.trainer, subcommand, model, exp_dir=self.exp_dir, writer=self.writer, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """`fit`, `validate`, `test`, `predict`: LightningCLI runs the subcommand through these when they exist."""
        if name in LIGHTNING_SUBCOMMANDS:
            return lambda model, **kwargs: self._mlfab_run(name, model, kwargs)
        raise AttributeError(name)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None or value is False else list(value) if isinstance(value, list | tuple) else [value]


def _field_help(cls: Any, parts: list[str]) -> str:
    """The `mlfab.field` help text of the (nested) config field at `parts`."""
    import dataclasses

    for part in parts[:-1]:
        cls = mlfab_config._dataclass_type(mlfab_config._field_types(cls).get(part))
        if cls is None:
            return ""
    found = [f for f in dataclasses.fields(cls) if f.name == parts[-1]]
    return field_help(found[0]) if found else ""


def _flatten(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{"model": {"hidden": 3}} -> {"<prefix>model.hidden": 3}, descending only into nested dataclass fields."""
    out: dict[str, Any] = {}
    types = mlfab_config._field_types(cls)
    for key, value in data.items():
        sub = mlfab_config._dataclass_type(types.get(key))
        if sub is not None and isinstance(value, dict):
            out.update(_flatten(sub, value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_cli(task_cls: type, args: Sequence[str], script_configs: Sequence[Any] = ()) -> int:
    """Runs Lightning's CLI (`args` starts with the subcommand) for `task_cls`; returns the exit code."""
    cls = task_cls.config_class()  # type: ignore[attr-defined]
    script_config = merge_sources(cls, *script_configs)
    unknown = mlfab_config._unknown_keys(cls, script_config, prefix="")
    if unknown:
        listing = "\n".join(f"  - {p}" for p in unknown)
        raise ConfigError(f"Invalid config given to {task_cls.__name__}.launch:\n{listing}")
    return MlfabCLI(task_cls, list(args), script_config).exit_code


USAGE = f"""usage: mlfab {{{",".join(LIGHTNING_SUBCOMMANDS)}}} --model package.module.TaskClass [--help] [ARGS ...]

Runs Lightning's CLI for any mlfab task, given by import path (the working directory is importable, as with
`python -m`). The arguments are those of `python -m package.module {{fit,...}}`, e.g.

  mlfab fit --model examples.digits.DigitsClassification --model.config.max_steps 200
  mlfab fit --model examples.digits.DigitsClassification --help
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The `mlfab` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    try:
        if args[0] not in LIGHTNING_SUBCOMMANDS:
            raise ValueError(f"unknown subcommand {args[0]!r}: expected one of {', '.join(LIGHTNING_SUBCOMMANDS)}")
        task_cls, rest = _take_task(args)
    except ValueError as e:
        print(f"{USAGE}\nmlfab: error: {e}", file=sys.stderr)
        return 2
    return run_cli(task_cls, rest)


def _take_task(args: list[str]) -> tuple[type, list[str]]:
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


def import_task(path: str) -> type:
    from mlfab.task import Task

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
