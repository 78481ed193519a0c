"""mlfab's one command line: Lightning's CLI (jsonargparse) with mlfab's run, for every way a task is started.

    python -m examples.digits max_steps=200                     (the short form: `fit`, see mlfab/cli/args.py)
    python -m examples.digits fit --model.config.max_steps 200 --trainer.max_time 00:00:10:00
    python -m examples.digits fit --config runs/digits_classification/run_0/config.yaml
    mlfab fit --model examples.mnist.MnistClassification --model.config.batch_size 16

jsonargparse parses and checks every value; the run is mlfab/run/pipeline.py's.
"""

import contextlib
import difflib
import functools
import io
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NoReturn

import jsonargparse
import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mlfab.checkpoints import check_ckpt_path, said, saved_at
from mlfab.cli.args import (
    PASSED_ON,
    SUBCOMMANDS,
    args_into_whole_values,
    config_file_args,
    short_form_args,
    short_form_usage,
    whole_value_at,
    whole_value_problem,
)
from mlfab.config import (
    MAX_SEED,
    away_from_defaults,
    build_config,
    config_problems,
    dataclass_type,
    field_help,
    field_types,
    load_yaml,
    merge,
    merge_sources,
    plain_data,
    problems_message,
    to_dict,
)
from mlfab.errors import ConfigError, MlfabError, report
from mlfab.loggers.base import MlfabLogger
from mlfab.optim import OPTIMIZER_CONFIG_KEYS
from mlfab.resume import PLACES
from mlfab.run.distributed import end_process_group, process_group_exists, resolve_hardware
from mlfab.run.invocation import command_name
from mlfab.run.pipeline import Run, RunRecords, execute, forgotten_if_refused, prepare_run, show, submit_to_slurm
from mlfab.run.provenance import rewound_at
from mlfab.run.rundir import (
    checkpoint_run,
    let_go_of_run_dirs,
    newest_checkpoint,
    refuse_other_tasks_run,
    run_dirs_held,
)
from mlfab.run.slurm import in_slurm_job
from mlfab.run.trainer import refuse_under_manual_optimization, resolve_precision, trainer_settings

if TYPE_CHECKING:
    from mlfab.task import Task

PRECEDENCE = (
    "Config values, later winning: the Config class defaults, the script's launch() config, the checkpoint's config "
    "(--ckpt_path), then --config files and --model.config.* flags in the order given, so values you give are never "
    "replaced by the checkpoint's. A --trainer.* argument given (as a flag or in a --config file) wins over the "
    "Trainer setting mlfab derives from the config, and one that sets what a config key sets (max_steps, "
    "accumulate_grad_batches, gradient_clip_val, limit_val_batches, accelerator, devices, num_nodes, strategy, "
    "precision; --seed_everything) sets that key too; given with the key as well, the later of the two wins (one file "
    "giving both, with different values, is an error). --print_config prints the run in config.yaml's layout."
)
DESCRIPTIONS = {
    "fit": "Trains the task: run directory, config.yaml, loggers, callbacks, Trainer settings from the config.",
    "validate": "Runs one validation (valid_batches batches of get_dataset('valid')): with --ckpt_path of a run's "
    "checkpoint, or --model.config.exp_dir of a run (its newest checkpoint, read as --ckpt_path), logged into that run "
    "at the checkpoint's step, else in a new run directory.",
    "test": "Runs get_dataset('test'), or 'valid' when it returns None for 'test': all of it, or valid_batches "
    "batches of an endless dataset; logged like validate.",
    "predict": "Runs get_prediction (by default the model on each batch's inputs) over get_dataset('predict'), or "
    "'test' or 'valid' when it returns None; saves the outputs to <run dir>/predictions/step_<N>.pt (N in 8 "
    "digits; the run of "
    "--ckpt_path's checkpoint, else a new run directory).",
}
LAUNCHERS = (None, "auto", "local", "slurm")
SKIP = object()
# Arguments that set what a config key sets: a value given is also the config's (converted by the function, which
# also sees the other arguments), so that the run (its cadences, checks, progress, diagnostics) and config.yaml
# agree with the Trainer. A value the key cannot hold (a fraction of batches, an Accelerator object, a list of
# devices) is the Trainer's alone.
SAME_AS_CONFIG: dict[str, tuple[str, Any]] = {
    "seed_everything": ("seed", lambda v, _: SKIP if v is None or v is False else int(v)),  # `true`: Lightning's 0.
    "trainer.max_steps": ("max_steps", lambda v, _: None if v == -1 else v),
    "trainer.accumulate_grad_batches": ("batches_per_step", lambda v, _: v),
    "trainer.gradient_clip_val": (  # Lightning's 0 is no clipping; clipping by value is no norm clipping.
        "clip_grad_norm",
        lambda v, cfg: SKIP if cfg.get("trainer.gradient_clip_algorithm") == "value" else v or None,
    ),
    "trainer.limit_val_batches": ("valid_batches", lambda v, _: _batch_count(v)),
    "trainer.accelerator": ("accelerator", lambda v, _: v),
    "trainer.devices": ("devices", lambda v, _: v),
    "trainer.num_nodes": ("num_nodes", lambda v, _: v),
    "trainer.strategy": ("strategy", lambda v, _: v),
    "trainer.precision": (  # Lightning's short names, as it reads them.
        "precision",
        lambda v, _: {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}.get(str(v), str(v)),
    ),
}


# The Trainer argument that limits each subcommand's batches.
LIMITS = {
    "fit": "limit_train_batches",
    "validate": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}


class ShortFormError(Exception):
    """jsonargparse refused arguments of the short form: `launch` explains it key by key."""


class Submitted(Exception):  # noqa: N818 - control flow: the run went to Slurm instead of starting here.
    pass


class MlfabArgumentParser(LightningArgumentParser):
    """Lightning's parser; an unrecognized flag also gets the closest known flags as suggestions."""

    short_form = False  # Set by MlfabCLI: a refusal is then explained by `launch` instead of printed.
    given_args: list[str] = []  # Set by MlfabCLI before parsing.

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A flag is its whole name: argparse took a prefix (`--model.config.batches 4`, `batches=4`) for the one key
        # it starts (batches_per_step), silently.
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.short_form:
            raise ShortFormError(message)
        if message.startswith("unrecognized arguments:"):
            parser = getattr(ex, "subcommand_parser", None) or self
            known = [o for o in parser._option_string_actions if o.startswith("--")]
            for token in message.partition(":")[2].split():
                close = difflib.get_close_matches(token.partition("=")[0], known, n=3, cutoff=0.8)
                if token.startswith("--") and close:
                    message += f"\n  {token}: did you mean {' or '.join(close)}?"
        elif unknown := re.search(r"does not accept option '([^']+)'", message):  # A key in a YAML file given.
            parser = getattr(ex, "subcommand_parser", None) or self
            known = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
            close = difflib.get_close_matches(unknown[1], known, n=3, cutoff=0.8)
            files = [path for flag, path in _section_files(self.given_args) if unknown[1] in _keys_in(flag, path)]
            message += f" (in {', '.join(files)})" if files else ""
            message += f"; did you mean {' or '.join(close)}?" if close else ""
        super().error(message, ex)


class MlfabCLI(LightningCLI):
    """LightningCLI with mlfab's run: see the module docstring, and `PRECEDENCE` for which value wins."""

    def __init__(
        self,
        task_cls: type["Task"],
        args: list[str],
        script_config: dict[str, Any],
        *,
        short_form: bool = False,
        launcher: str | None = None,
    ) -> None:
        self.task_cls, self.script_config = task_cls, script_config
        self.short_form, self.launcher = short_form, launcher
        self.exit_code, self.args = 0, args
        # --print_config is answered here, after the checkpoint's config is merged, in config.yaml's layout.
        if options := [a for a in args[1:] if a.startswith("--print_config=")]:
            raise ConfigError(
                f"{options[0]}: mlfab's --print_config takes no options (jsonargparse's skip_null, skip_default, ... "
                "are for its own layout): it prints the run as config.yaml will hold it. Give --print_config alone."
            )
        rest = [a for a in args[1:] if a != "--print_config"]
        self.print_run_file, args = len(rest) < len(args) - 1, args[:1] + rest
        kwargs = {sub: {"description": f"{DESCRIPTIONS[sub]} {PRECEDENCE}"} for sub in self.subcommands()}
        super().__init__(
            task_cls,
            args=args,
            save_config_callback=None,
            seed_everything_default=False,
            load_from_checkpoint_support=False,
            parser_class=MlfabArgumentParser,
            parser_kwargs={"prog": command_name(), **kwargs},
        )

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """Only the subcommand asked for: each one's parser (every Trainer argument, with its docstring) is built
        anew for every launch, and the others would be built for nothing."""
        every = LightningCLI.subcommands()
        return {self.args[0]: every[self.args[0]]} if self.args and self.args[0] in every else every

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.short_form = self.short_form  # type: ignore[attr-defined]
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """`mlfab.field(help=...)` as the help of each `--model.config.*` flag; the script's config as defaults."""
        cls = self.task_cls.config_class()
        defaults = _flatten(cls, self.script_config, "model.config.")
        if defaults:
            parser.set_defaults(defaults)
        for action in parser._actions:
            if action.dest.startswith("model.config."):
                action.help = _field_help(cls, action.dest.split(".")[2:]) or action.help
            if action.dest in defaults:  # A field the class requires but the script sets.
                action.required = False

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if any(a in ("-h", "--help") for a in args):
            self._show_current_values([a for a in args if a not in ("-h", "--help")])
        else:
            refuse_flags_into_whole_values(self.task_cls.config_class(), args, self.script_config)
        for path in _files_given(args):  # jsonargparse reads them as PyYAML does: a key given twice, the last.
            load_yaml(path)
        parser.given_args = list(args)  # type: ignore[attr-defined]  # (For `error` to name the file of a key.)
        self.config = parser.parse_args(args)
        cfg = self.config[self.config.subcommand]
        self.pruned_ckpt_path = None
        self.run_config: dict[str, Any] | None = None  # Into a run: its config, where Lightning does not lay it.
        self.run_trainer: dict[str, Any] = {}  # The Trainer arguments a fit into a run was started with.
        if cfg.get("ckpt_path") is not None:  # Before Lightning reads it, and before any run.
            if (run := checkpoint_run(cfg["ckpt_path"])) is not None:
                refuse_other_tasks_run(run, self.task_cls, f"--ckpt_path {cfg['ckpt_path']}")
            newest = _went_on_from_pruned(cfg) if self.config.subcommand == "fit" else None
            if newest is None:
                check_ckpt_path(cfg["ckpt_path"])
            else:  # Lightning reads the config from the checkpoint the run goes on from; `--ckpt_path` comes back next.
                self.pruned_ckpt_path, cfg["ckpt_path"] = cfg["ckpt_path"], str(newest)
        elif cfg.get("model.config.exp_dir"):
            # Into a run with checkpoints, the run's config is the base under the values given, not the script's
            # defaults. An evaluation evaluates its newest checkpoint (see `_mlfab_run`): as its `--ckpt_path`, which
            # Lightning reads the config from. A fit goes on from it: the config of its config.yaml (the checkpoint is
            # read once, when the fit restores it).
            exp_dir = Path(cfg["model.config.exp_dir"]).expanduser().resolve()
            refuse_other_tasks_run(exp_dir, self.task_cls, f"exp_dir {exp_dir}")
            newest = newest_checkpoint(exp_dir)
            if newest is not None and self.config.subcommand != "fit":
                cfg["ckpt_path"], self.run_config = str(newest), {}  # (The checkpoint's config: Lightning's to lay.)
            elif newest is not None and (exp_dir / "config.yaml").is_file():
                run_file = load_yaml(exp_dir / "config.yaml")
                self.run_config = (run_file.get("model") or {}).get("config")
                self.run_trainer = run_file.get("trainer") or {}
        seed = cfg.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:  # Seeded before checks.
            problem = f"key 'seed_everything': must be an integer from 0 to {MAX_SEED} (got {seed})"
            raise ConfigError(problems_message(self.task_cls.config_class().__name__, [problem]))
        # The same arguments without defaults: what the user gave (flags and --config files), which must win.
        self.given, self.parsed_args = parser.parse_args(args, defaults=False), list(args)

    def _show_current_values(self, args: list[str]) -> None:
        """For `--help` after other arguments: each config flag they set shows the value it now has."""
        parser = self._subcommand_parsers.get(args[0]) if args else None
        if parser is None or len(args) < 2:
            return
        required = [a for a in parser._actions if a.required]
        for action in required:  # What the arguments set, even where they leave a required key out.
            action.required = False
        try:
            refuse_flags_into_whole_values(self.task_cls.config_class(), args[1:], self.script_config)
            given = parser.parse_args(args[1:], defaults=False)
        except (ShortFormError, SystemExit, jsonargparse.ArgumentError, ConfigError):
            return  # Arguments with a mistake: the help is still shown, without current values.
        finally:
            for action in required:
                action.required = True
        values = {k: v for k, v in given.items() if k.startswith("model.config.")}
        for action in parser._actions:
            if action.dest in values:
                value = values[action.dest]
                value = value.as_dict() if isinstance(value, jsonargparse.Namespace) else value
                action.help = f"{action.help} [current: {show(value)}]"

    def given_keys(self) -> list[str]:  # Dotted: "model.config.batch_size", "trainer.max_steps", "ckpt_path", ...
        """Without jsonargparse's own `__path__` entries (where `--trainer FILE` or `--model FILE` gave a section)."""
        sub = self.config.subcommand
        keys = self.given[sub].keys() if self.given.get(sub) else []
        return [k for k in keys if k.rpartition(".")[2] != "__path__"]

    def before_instantiate_classes(self) -> None:
        sub = self.config.subcommand
        cfg, given = self.config[sub], self.given_keys()
        if self.pruned_ckpt_path is not None:
            cfg["ckpt_path"] = self.pruned_ckpt_path
        for key in given:
            if key.startswith("model."):  # Lightning put the checkpoint's config over everything; undo that for these.
                cfg[key] = self.given[sub][key]
        self.kept_from_run: list[str] = []  # The run's values where the script's launch() has the default.
        if self.run_config is not None:  # Into a run: its config, under the values given and those the script's
            cls = self.task_cls.config_class()  # launch() sets away from the defaults.
            self._refuse_trainer_arguments_left_out(given)
            script = away_from_defaults(cls, self.script_config, "model.config.")
            flagged = {f"model.config.{key}" for flag, (key, _) in SAME_AS_CONFIG.items() if flag in given}
            for key, value in script.items():  # (An evaluation's: Lightning laid the checkpoint's config over them.)
                if key not in given and key not in flagged and key in cfg:
                    cfg[key] = value
            run_values = _flatten(cls, self.run_config, "model.config.")
            if gone := [p for p in config_problems(cls, self.run_config, rules=False) if p.startswith("unknown key")]:
                raise ConfigError(  # (Each with its close matches, as a typo there would be.)
                    f"This run's config.yaml holds keys {cls.__name__} does not declare ({'; '.join(gone)}), so the "
                    "relaunch cannot keep them. Declare them again, fix a typo there, or delete them from the run's "
                    "config.yaml (its provenance/ folder keeps each launch's copy) to go on without them."
                )
            for key, value in run_values.items():
                if key not in given and key not in flagged and key not in script and key in cfg:
                    now = cfg[key].as_dict() if isinstance(cfg[key], jsonargparse.Namespace) else cfg[key]
                    if plain_data(now) != plain_data(value) and key.rpartition(".")[2] not in PLACES:
                        self.kept_from_run.append(f"{key.removeprefix('model.config.')}={show(value)}")
                    cfg[key] = value
        ckpt = cfg.get("ckpt_path")
        if ckpt is not None and "model.config.exp_dir" not in given:
            # Not the checkpoint's own exp_dir, which Lightning merged in: an evaluation of a run's checkpoint is
            # logged into that run; a fit from a checkpoint (or anything of a file outside a run) gets this launch's
            # directory, so it never rewinds nor rewrites another run.
            run = checkpoint_run(ckpt) if sub != "fit" else None
            cfg["model.config.exp_dir"] = str(run) if run is not None else self.script_config.get("exp_dir")
        refuse_ignored_arguments(given, cfg, self.args)
        config_cls = self.task_cls.config_class()
        self.translated: set[str] = set()  # Given as config values: config.yaml records them there only.
        for flag, (key, convert) in SAME_AS_CONFIG.items():
            value = convert(cfg[flag], cfg) if flag in given else SKIP
            # A value the config key cannot hold (an Accelerator object, a list of devices) is the Trainer's alone.
            if value is SKIP or _key_problems(config_cls, key, value, rules=False):
                continue
            # Out of the key's range: Lightning would take it as it is (gradient_clip_val=-1 flips every gradient).
            if out_of_range := _key_problems(config_cls, key, value):
                raise ConfigError(
                    f"--{flag} {show(cfg[flag])} sets the config key {key}, so it is held to its rule: "
                    + "; ".join(out_of_range)
                )
            self.translated.add(flag)  # Where the config's key is given later, its value is the Trainer's too.
            if f"model.config.{key}" not in given or self.given_later(flag, key, value):
                cfg[f"model.config.{key}"] = value
        if cfg.get("trainer.gradient_clip_algorithm") == "value":
            cfg["model.config.clip_grad_norm"] = None  # Clipped by value: not by norm (the flag below is required).
        config = build_config(config_cls, cfg["model.config"].as_dict())
        to_slurm = self.launcher == "slurm" and not in_slurm_job()
        if not to_slurm:  # Before any run (a login node submitting to Slurm need not have the job's hardware).
            hardware = resolve_hardware(config.accelerator, config.devices, config.num_nodes, config.strategy)
            resolve_precision(config.precision, hardware["accelerator"])
        if self.print_run_file:
            trainer, extra = self.given_sections(with_ckpt=True)
            print(yaml.safe_dump({**extra, "model": {"config": to_dict(config)}, "trainer": trainer}, sort_keys=False))
            raise SystemExit(0)
        if to_slurm:
            submit_to_slurm(self.task_cls, config, self.args)
            raise Submitted
        pl.seed_everything(config.seed, workers=True, verbose=False)

    def given_later(self, flag: str, key: str, value: Any) -> bool:
        """Whether the argument `flag` (`value` for config key `key`) wins over the config key, both given: it was given
        after it, or with the same value. Refused where one argument (a file) gives both, or the order is unknown."""
        cfg, config_key = self.config[self.config.subcommand], f"model.config.{key}"
        if cfg[config_key] == value:
            return True
        arguments = self.arguments_given()
        last = {k: i for i, (_, keys) in enumerate(arguments or []) for k in keys}
        if flag in last and config_key in last and last[flag] != last[config_key]:
            return last[flag] > last[config_key]
        where = f"`{arguments[last[flag]][0]}` gives both" if arguments and flag in last else "in no order mlfab reads"
        raise ConfigError(
            f"{flag}: {show(cfg[flag])} and {config_key}: {show(cfg[config_key])} both set {key}, and {where}, so "
            "neither comes later to win: give only one of them, or the same value in both."
        )

    def arguments_given(self) -> list[tuple[str, list[str]]] | None:
        """The arguments after the subcommand in order, each as typed (a flag with its values, or a file) with the
        dotted keys it gives; None where one cannot be read on its own."""
        groups: list[list[str]] = []
        for token in self.parsed_args[1:]:
            if token.startswith("--") or token == "-c" or not groups:
                groups.append([token])
            else:
                groups[-1].append(token)
        parser, arguments = self._parser(self.config.subcommand), []
        for group in groups:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    arguments.append((" ".join(group), list(parser.parse_args(group, defaults=False).keys())))
            except (ShortFormError, SystemExit, jsonargparse.ArgumentError):
                return None
        return arguments

    def given_sections(self, with_ckpt: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Trainer arguments given, and the other given top-level entries (optimizer, data, ...), as plain data."""
        sub = self.config.subcommand
        dump = yaml.safe_load(self._parser(sub).dump(self.config[sub])) or {}
        keys = self.given_keys()
        trainer_keys = dict.fromkeys(
            k.split(".")[1] for k in keys if k.startswith("trainer.") and k not in self.translated
        )
        trainer = {k: (dump.get("trainer") or {}).get(k) for k in trainer_keys}
        skip = {"config", "model", "trainer", "seed_everything", *(() if with_ckpt else ("ckpt_path", "weights_only"))}
        extra = {k: dump.get(k) for k in dict.fromkeys(k.split(".")[0] for k in keys) if k not in skip}
        return trainer, extra

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """mlfab's Trainer for the config, the `--trainer.*` arguments given over it, in the run's directory."""
        task, config = self.model, self.model.config
        trainer_given, extra = self.given_sections(with_ckpt=False)
        values = self._get(self.config_init, "trainer", default={})
        own_loggers = "logger" in trainer_given
        self.run: Run = prepare_run(task, trainer_given, extra, not own_loggers, self.config.subcommand)
        task._optimizer_args = {k: extra[k] for k in ("optimizer", "lr_scheduler") if k in extra}  # For resumes.
        loggers = values["logger"] if own_loggers else task._mlfab_loggers
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        callbacks += _as_list(values.get("callbacks")) if "callbacks" in trainer_given else []
        plugins = _as_list(values.get("plugins")) if "plugins" in trainer_given else []
        with forgotten_if_refused(self.run.exp_dir, self.run.created):  # E.g. a Trainer argument Lightning refuses.
            if "log_every_n_steps" in trainer_given and all(isinstance(x, MlfabLogger) for x in _as_list(loggers)):
                raise ConfigError(
                    "--trainer.log_every_n_steps: mlfab's loggers write every log_interval_seconds (an argument of "
                    "each logger; 0 writes every step), not every N steps; it applies to Lightning's own loggers."
                )
            settings = {**values, **trainer_settings(config, self.run.exp_dir, loggers, callbacks, plugins)}
            for key in trainer_given:
                if key not in ("logger", "callbacks", "plugins"):
                    settings[key] = values[key]
            refuse_under_manual_optimization(
                task, settings.get("gradient_clip_val"), settings.get("accumulate_grad_batches")
            )
            return self.trainer_class(**{**settings, **kwargs})

    def _refuse_trainer_arguments_left_out(self, given: list[str]) -> None:
        """A fit into a run keeps the run's config, but cannot rebuild its Trainer arguments (callbacks, clipping by
        value...) from its file: one the run was started with and the relaunch leaves out is refused, not dropped."""
        left_out = [
            k for k in self.run_trainer if not any(g == f"trainer.{k}" or g.startswith(f"trainer.{k}.") for g in given)
        ]
        if left_out:
            shown = ", ".join(f"--trainer.{k} {show(self.run_trainer[k])}" for k in left_out)
            raise ConfigError(
                f"This run was started with Trainer arguments the relaunch does not give: {shown}. Give them again, "
                "or relaunch with the run's file (`--config <exp_dir>/config.yaml`, or the file as the first argument "
                "in the key=value form), which holds them."
            )

    def _mlfab_run(self, subcommand: str, model: Any, kwargs: dict[str, Any]) -> None:
        """The run, for any subcommand: into a run directory with checkpoints, without `--ckpt_path`, a fit resumes
        from the newest and an evaluation evaluates it (`parse_arguments` made it the `--ckpt_path`, for its config). A
        fit also does when `--ckpt_path` names another run's checkpoint, or one of this run's that an earlier launch
        already went on from (it started this run, or rewound it: a relaunch or a requeued Slurm job, whose command
        keeps it, goes on from where this run got to)."""
        given = kwargs.get("ckpt_path")
        own = newest_checkpoint(self.run.exp_dir) if subcommand == "fit" or given is None else None
        if own is not None and given is not None:
            why = _goes_on_instead(self.run.exp_dir, given, own)
            if why is None:
                own = None
            elif self.run.writer:
                print(f"Resuming from this run's newest checkpoint, not --ckpt_path {given} ({why}).")
        if own is not None:
            kwargs["ckpt_path"] = own
        if subcommand != "fit" and kwargs.get("ckpt_path") is None and self.run.writer:  # Chance-level numbers.
            print(
                f"Note: {subcommand} evaluates {type(model).__name__} as its __init__ built it: no --ckpt_path, and "
                f"{self.run.exp_dir} has no checkpoint, so its weights are untrained unless __init__ loads them. "
                "Give --ckpt_path <file>, or --model.config.exp_dir <run> of a trained run.",
                file=sys.stderr,
                flush=True,
            )
        if self.kept_from_run and self.run.writer:
            print(
                f"Kept this run's {', '.join(self.kept_from_run)}: a relaunch changes only the values it gives (the "
                "script's launch() has the Config's defaults there)."
            )
        limit = LIMITS[subcommand]
        if getattr(self.trainer, limit) == 0:  # Lightning would run nothing and end as if it had, silently.
            why = "valid_batches is 0 (validation off)" if subcommand == "validate" else f"--trainer.{limit} is 0"
            raise ConfigError(
                f"{subcommand} would run no batch: {why}. Set --trainer.{limit}"
                + (" (or --model.config.valid_batches)" if subcommand == "validate" else "")
                + f" to the number of batches to {subcommand} on, or leave it out."
            )
        self.exit_code = execute(self.trainer, subcommand, model, self.run, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """`fit`, `validate`, `test`, `predict`: LightningCLI runs the subcommand through these when they exist."""
        if name in SUBCOMMANDS:
            return lambda model, **kwargs: self._mlfab_run(name, model, kwargs)
        raise AttributeError(name)


def _section_files(args: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, file) of each YAML file an argument that takes a whole section names (`--config`, `-c`,
    `--model.config`, `--model`, `--trainer`, ...; a value that is no file is left alone)."""
    flags = ("--config", "-c", "--model.config", "--model", "--trainer", "--data", "--optimizer", "--lr_scheduler")
    named = [arg.partition("=")[::2] for arg in args if arg.partition("=")[0] in flags and "=" in arg]
    named += [(flag, after) for flag, after in zip(args, args[1:], strict=False) if flag in flags]
    return [(flag, path) for flag, path in named if Path(path).expanduser().is_file()]


def _files_given(args: Sequence[str]) -> list[str]:
    return [path for _, path in _section_files(args)]


def _keys_in(flag: str, path: str) -> set[str]:
    """The dotted keys a section file given with `flag` sets, as the subcommand's parser names them."""
    prefix = "" if flag in ("--config", "-c") else flag[2:] + "."
    try:
        data = load_yaml(path)
    except ConfigError:  # (Read once already, by `parse_arguments`.)
        return set()
    keys, todo = set(), [(prefix, data)]
    while todo:
        at, value = todo.pop()
        if isinstance(value, dict):
            todo += [(f"{at}{key}.", sub) for key, sub in value.items()]
        keys.add(at.rstrip("."))
    return keys


def refuse_flags_into_whole_values(config_cls: type, args: Sequence[str], script_config: dict[str, Any]) -> None:
    """`--model.config.<key>.<more>` arguments into a value set only whole (a tuple, list, number...), which
    jsonargparse would misread (`--model.config.crop.1 16` as crop (1, 16)), refused before it parses them."""
    problems = []
    for i, arg in enumerate(args):
        flag, given, raw = arg.partition("=")
        key = flag.removeprefix("--model.config.")
        if key == flag or whole_value_at(config_cls, key.split(".")) is None:
            continue
        value = raw if given else args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        problems.append(whole_value_problem(config_cls, key, value, script_config, flag=True))
    if problems:
        raise ConfigError(problems_message(config_cls.__name__, problems))


def refuse_ignored_arguments(given: Sequence[str], cfg: Any, args: Sequence[str]) -> None:
    """Arguments that Lightning would take and mlfab would then ignore or contradict, refused before any run."""
    problems = []
    if "trainer.default_root_dir" in given:
        problems.append(
            "--trainer.default_root_dir: a run keeps everything (checkpoints, logs, signal checkpoints) in its "
            "directory; give exp_dir (this run's directory) or run_dir (where new runs go) instead"
        )
    if "trainer.enable_checkpointing" in given:
        problems.append(
            "--trainer.enable_checkpointing: mlfab writes last.ckpt when training ends and the checkpoints of "
            "save_every_n_steps / save_every_n_seconds (null turns each off); set those instead"
        )
    by_value = cfg.get("trainer.gradient_clip_algorithm") == "value"
    if by_value and "trainer.gradient_clip_val" not in given:
        problems.append(
            "--trainer.gradient_clip_algorithm value needs --trainer.gradient_clip_val, the value to clip at "
            "(clip_grad_norm is a gradient norm, which value clipping does not use)"
        )
    clip = cfg.get("trainer.gradient_clip_val")
    positive = isinstance(clip, int | float) and 0 < clip < math.inf
    if by_value and "trainer.gradient_clip_val" in given and not positive:
        problems.append(  # Lightning clips nothing at 0 or below, silently.
            f"--trainer.gradient_clip_val {clip} with clipping by value: must be a number > 0 (the largest gradient "
            "entry kept)"
        )
    if by_value and "model.config.clip_grad_norm" in given and cfg.get("model.config.clip_grad_norm") is not None:
        problems.append(  # It was set to null, silently: one clipping or the other.
            f"clip_grad_norm {cfg['model.config.clip_grad_norm']} with --trainer.gradient_clip_algorithm value: a "
            "step is clipped by norm (mlfab) or by value (Lightning), not both; drop one of them"
        )
    optimizer = any(k == "optimizer" or k.startswith("optimizer.") for k in given)
    if not optimizer and any(k == "lr_scheduler" or k.startswith("lr_scheduler.") for k in given):
        problems.append(  # Lightning's CLI attaches it only to an optimizer it builds itself, and drops it silently.
            "--lr_scheduler without --optimizer: Lightning's command line attaches a scheduler only to the optimizer "
            "--optimizer builds; give --optimizer too, or return (optimizer, scheduler) from build_optimizer"
        )
    if optimizer:
        typed = [k for k in OPTIMIZER_CONFIG_KEYS if any(a.split("=")[0] == f"--model.config.{k}" for a in args)]
        if typed:
            problems.append(
                f"{', '.join(typed)} with --optimizer: the optimizer --optimizer names is built from its own "
                "arguments and never reads them; give them as --optimizer.* arguments (e.g. --optimizer.lr), or "
                "drop --optimizer to use mlfab's default optimizer"
            )
    if problems:
        raise ConfigError("Arguments mlfab would ignore:\n" + "\n".join(f"  - {p}" for p in problems))


def _key_problems(config_cls: type, key: str, value: Any, rules: bool = True) -> list[str]:
    """What is wrong with `value` for the config key `key` (its type; with `rules`, its range too)."""
    return [p for p in config_problems(config_cls, {key: value}, rules=rules) if "required" not in p]


def _batch_count(value: Any) -> Any:
    """Lightning reads a whole number other than 1 as a number of batches (the command line gives `3` as 3.0), and
    1 or 1.0, like any other fraction, as a share of them."""
    return int(value) if isinstance(value, int | float) and value != 1 and float(value).is_integer() else SKIP


def _goes_on_instead(exp_dir: Path, given: Any, own: Path) -> str | None:
    """Why a fit into the run `exp_dir` goes on from its newest checkpoint `own` rather than from `--ckpt_path` `given`
    (see `MlfabCLI._mlfab_run`); None when it starts from `given`."""
    if Path(own).resolve() == Path(given).resolve():
        return None
    if not _holds(exp_dir, given):
        return "which started it"
    if (rewound := rewound_at(exp_dir, given)) is not None and saved_at(own) >= rewound:
        return "which an earlier launch of this run already went on from"
    # A rewind of this run to one of its checkpoints, asked for; or asked again, where the launch that rewound saved
    # nothing (the newest checkpoint is from before the rewind).
    return None


def _went_on_from_pruned(cfg: Any) -> Path | None:
    """For `fit --ckpt_path` of a checkpoint file that is gone (pruned by keep_last_n_checkpoints): the run's newest
    checkpoint, where an earlier fit of the run (`exp_dir`) went on from that file and the run goes on from its own
    newest anyway. The same command, relaunched or requeued, then goes on; a missing file the run never started from
    is refused (`check_ckpt_path`)."""
    given, exp_dir = Path(cfg["ckpt_path"]).expanduser(), cfg.get("model.config.exp_dir")
    if given.exists() or not exp_dir:
        return None
    exp_dir = Path(exp_dir).expanduser().resolve()
    own = newest_checkpoint(exp_dir, writer=False)
    if own is None or rewound_at(exp_dir, given) is None or _goes_on_instead(exp_dir, given, own) is None:
        return None
    return own


def _holds(exp_dir: Any, ckpt: Any) -> bool:
    """Whether the checkpoint file lies inside the run directory `exp_dir`."""
    return bool(exp_dir) and Path(exp_dir).expanduser().resolve() in Path(ckpt).expanduser().resolve().parents


def _as_list(value: Any) -> list[Any]:
    return [] if value is None or value is False else list(value) if isinstance(value, list | tuple) else [value]


def _field_help(cls: Any, parts: list[str]) -> str:
    """The `mlfab.field` help text of the (nested) config field at `parts`."""
    for part in parts[:-1]:
        cls = dataclass_type(field_types(cls).get(part))
        if cls is None:
            return ""
    found = getattr(cls, "__dataclass_fields__", {}).get(parts[-1])
    return field_help(found) if found else ""


def _flatten(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{"model": {"hidden": 3}} -> {"<prefix>model.hidden": 3}, descending only into nested dataclass fields."""
    out: dict[str, Any] = {}
    types = field_types(cls)
    for key, value in data.items():
        sub = dataclass_type(types.get(key))
        if sub is not None and isinstance(value, dict):
            out.update(_flatten(sub, value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_cli(
    task_cls: type["Task"],
    args: Sequence[str],
    configs: Sequence[Any] = (),
    launcher: Any = None,
    short_form: bool = False,
) -> int:
    """Runs `args` (a subcommand and its arguments) for `task_cls`, over the `configs` the script gives; returns the
    exit code. YAML files among `configs` are read like files on the command line, before `args`."""
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"Unknown launcher {launcher!r}: use None (train here, on the devices the config asks for; torchrun and "
            "multi-node environments are detected) or 'slurm'."
        )
    said.clear()  # Each launch says again what it finds (a damaged checkpoint, ...), once.
    script, file_args, _ = script_sources(task_cls, configs)
    if _has_unknown_keys(task_cls.config_class(), script):  # jsonargparse could not even take them as defaults.
        problems = [p for p in config_problems(task_cls.config_class(), script) if not p.startswith("missing required")]
        raise ConfigError(problems_message(f"{task_cls.__name__}.launch", problems))
    args = [args[0], *file_args, *args[1:]]
    held = run_dirs_held()  # By a fit this launch runs inside (a task launching another): kept.
    grouped = process_group_exists()
    try:
        return MlfabCLI(task_cls, args, script, short_form=short_form, launcher=launcher).exit_code
    except Submitted:
        return 0
    finally:
        let_go_of_run_dirs(keep=held)
        end_process_group(existed=grouped)


def _has_unknown_keys(cls: type, data: dict[str, Any]) -> bool:
    types = field_types(cls)
    for key, value in data.items():
        sub = dataclass_type(types[key]) if key in types else None
        if key not in types or (sub is not None and isinstance(value, dict) and _has_unknown_keys(sub, value)):
            return True
    return False


def script_sources(task_cls: type["Task"], configs: Sequence[Any]) -> tuple[dict[str, Any], list[str], list[Any]]:
    """What the script gives `launch`: its dataclasses and dicts merged (the defaults), the arguments that read its
    YAML files, and those files' config values."""
    script = merge_sources(task_cls.config_class(), *(c for c in configs if not isinstance(c, str | PurePath)))
    read = [config_file_args(task_cls, c) for c in configs if isinstance(c, str | PurePath)]
    return script, [a for args, _ in read for a in args], [values for _, values in read]


def launch(task_cls: type["Task"], *configs: Any, launcher: Any = None, argv: list[str] | None = None) -> None:
    """`Task.launch`: `argv` (default: the command line) in the short form, or with a subcommand first.

    A user error (an `mlfab.MlfabError`: a bad config value, setting, task definition, dataset, checkpoint...) is
    reported by who launched: with `argv` None, the program's own command line, it ends the program with
    `error: <message>` on stderr and exit status 2 for a usage error (ConfigError, SettingsError,
    TaskDefinitionError, SlurmError) or 1 for a failed run (DatasetError, CheckpointError, NonFiniteError), the
    traceback only with MLFAB_TRACEBACK=1 (and in `<exp_dir>/logs/errors.log` once the run has a directory). With
    `argv` given (tests, scripts, notebooks) it is raised. Any other exception keeps its traceback either way.
    """
    if argv is None:
        with user_errors_exit():
            launch(task_cls, *configs, launcher=launcher, argv=sys.argv[1:])
        return
    argv = list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        code = run_cli(task_cls, argv, configs, launcher)
    else:
        asks_help = any(a.partition("=")[0] in ("-h", "--help") for a in argv)
        into_values = [] if asks_help else args_into_whole_values(task_cls.config_class(), argv)
        short = [a for a in argv if a not in into_values]
        args, values = short_form_args(task_cls, short)
        # The file that gave each of `values` (None for a `key=value`), for its problems to name it.
        files = [None if "=" in a else a for a in short if a.partition("=")[0] not in PASSED_ON]
        if into_values:  # Explained with every other problem of the config given.
            raise ConfigError(_explain(task_cls, configs, values, None, into_values, files))
        if "--help" in args or "-h" in args:
            print(short_form_usage())
        try:
            code = run_cli(task_cls, ["fit", *args], configs, launcher, short_form=True)
        except ShortFormError as e:
            raise ConfigError(_explain(task_cls, configs, values, str(e), files=files)) from None
    if code:
        raise SystemExit(code)


def _explain(
    task_cls: type["Task"],
    configs: Sequence[Any],
    values: list[dict[str, Any]],
    said: str | None,
    into_values: Sequence[str] = (),
    files: Sequence[str | None] = (),
) -> str:
    """jsonargparse refused the short form's arguments (it `said` why), or mlfab refused `key=value` arguments
    `into_values` (`args_into_whole_values`) before it parsed them: every problem, by the key as typed, when they
    are config values; else what jsonargparse said."""
    script, _, file_values = script_sources(task_cls, configs)
    config_cls = task_cls.config_class()
    given = functools.reduce(lambda base, over: merge(base, over, config_cls), [*file_values, *values], script)
    problems = [
        whole_value_problem(config_cls, key, raw, given, flag=False)
        for key, _, raw in (arg.partition("=") for arg in into_values)
    ]
    problems += [_in_file(problem, values, files) for problem in config_problems(config_cls, given)]
    hint = f"See `{command_name()} --help` for what each argument takes."
    if said is not None and problems and not config_problems(config_cls, given, rules=False):
        problems.append(f"{said} ({hint})")  # Values out of range, and a refusal they do not explain.
    if problems:
        return problems_message(config_cls.__name__, problems)
    return f"{said}\n{hint}"


def _in_file(problem: str, values: Sequence[Mapping[str, Any]], files: Sequence[str | None]) -> str:
    """An unknown key's problem, naming the YAML file that gave it (the last one, as the last value wins)."""
    unknown = re.match(r"unknown key '([^']+)'", problem)
    if unknown is None:
        return problem
    for data, file in reversed(list(zip(values, files, strict=True))):
        if file is None:
            continue
        for part in unknown.group(1).split("."):
            data = data.get(part, _MISSING) if isinstance(data, Mapping) else _MISSING
        if data is not _MISSING:
            return f"{problem} (in {file})"
    return problem


_MISSING = object()


# ---------------------------------------------------------------------------------------------------------------------
# User errors of a program: a short message and an exit status, not a traceback.


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """Ends the program on a user error (`mlfab.MlfabError`) with `error: <message>` on stderr and its exit status
    (`mlfab.errors.report`), the traceback also in the run directory's `logs/errors.log` when the run had started.
    Any other exception goes on with its traceback."""
    try:
        yield
    except MlfabError as e:
        raise SystemExit(report(e, run_dir_of(e))) from None


def run_dir_of(error: BaseException) -> Path | None:
    """The directory of the run `error` escaped from, if the run had started (wrote its records) and this process
    writes its files; a launch refused before that leaves the directory as it was (`mlfab.run.pipeline.execute`).
    The `MlfabCLI` the error passed through (it may leave from inside its constructor) holds the run and Trainer."""
    tb = error.__traceback__
    while tb is not None:
        cli = tb.tb_frame.f_locals.get("self")
        if isinstance(cli, MlfabCLI):
            run, trainer = getattr(cli, "run", None), getattr(cli, "trainer", None)
            records = [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, RunRecords)]
            if isinstance(run, Run) and run.writer and any(r.written for r in records) and run.exp_dir.is_dir():
                return run.exp_dir
        tb = tb.tb_next
    return None
