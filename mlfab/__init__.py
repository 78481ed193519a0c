"""mlfab: try out machine-learning ideas fast. This file is the table of contents.

Everything meant for users is exported here (`__all__`, pinned by tests/test_repo.py), plus `mlfab.testing` for
tests of your own. The modules behind it (`mlfab.config`, `mlfab.data`, `mlfab.logs`, `mlfab.loggers`, `mlfab.run`,
`mlfab.cli`, ...) are internal: their names may change between releases.
"""

# Lightning before mlfab's own imports (torch, dpshdl, torchdata, Pillow): in a fresh interpreter `import mlfab`
# took 2.36 s this way and 2.55 s with mlfab's modules first (medians of 6; `import lightning.pytorch`: 2.24 s).
import lightning.pytorch  # noqa: F401

from mlfab.config import Config, field
from mlfab.data import worker_shard
from mlfab.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MlfabError,
    NonFiniteError,
    SettingsError,
    SlurmError,
    TaskDefinitionError,
)
from mlfab.loggers.base import MlfabLogger, PlainLogger
from mlfab.loggers.json import JsonLogger
from mlfab.loggers.stdout import StdoutLogger
from mlfab.loggers.tensorboard import TensorboardLogger
from mlfab.loggers.wandb import WandbLogger
from mlfab.nets import detached_call
from mlfab.settings import get_data_dir, get_pretrained_models_dir, get_run_dir
from mlfab.state import Phase, State
from mlfab.task import Task

__version__ = "0.3.0.dev0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DatasetError",
    "JsonLogger",
    "MlfabError",
    "MlfabLogger",
    "NonFiniteError",
    "Phase",
    "PlainLogger",
    "SettingsError",
    "SlurmError",
    "State",
    "StdoutLogger",
    "Task",
    "TaskDefinitionError",
    "TensorboardLogger",
    "WandbLogger",
    "detached_call",
    "field",
    "get_data_dir",
    "get_pretrained_models_dir",
    "get_run_dir",
    "worker_shard",
]
