"""`mlfab.field`: a dataclass field with help text, the building block of every config."""

import copy
import dataclasses
from typing import Any

HELP_KEY = "help"


def field(default: Any = dataclasses.MISSING, *, help: str) -> Any:  # noqa: A002
    """A dataclass field with help text (shown by `--help`).

    A callable default becomes a default factory; a mutable default (list, dict, set, dataclass) is
    deep-copied for every instance, so two configs never share it.
    """
    metadata = {HELP_KEY: help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if callable(default):  # Includes classes: `field(ModelConfig, ...)` gives each instance a fresh one.
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, list | dict | set) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP_KEY, "")
