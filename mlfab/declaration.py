"""How a Task subclass declares its config: `class MyTask(mlfab.Task[MyConfig])`.

The config class is read from the generic argument. Each subclass's `__init__` is wrapped so a plain mapping
(hyperparameters read back from a checkpoint) arrives as the typed config; a subclass without an `__init__`
of its own gets one whose annotation names its config, because jsonargparse reads that annotation (an
`__init__(self, config)` without one, or naming a base class of the config, gets it filled in).
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from mlfab.config import build_config


def find_config_class(cls: type, task_base: type) -> type | None:
    """The dataclass in `class MyTask(mlfab.Task[MyConfig])`, searched through the class hierarchy."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = get_origin(base)
            if isinstance(origin, type) and issubclass(origin, task_base):
                for arg in get_args(base):
                    if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                        return arg
    return None


def typed_config_init(init: Any) -> Any:
    """Wraps `__init__` so a mapping becomes the typed Config before the user's code reads `config.x`."""
    if getattr(init, "_mlfab_typed", False):
        return init

    @functools.wraps(init)
    def wrapper(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(config, Mapping):
            config = build_config(type(self).config_class(), config)
        init(self, config, *args, **kwargs)

    wrapper._mlfab_typed = True  # type: ignore[attr-defined]
    return wrapper


def prepare_subclass(cls: type, task_base: type) -> None:
    init = cls.__dict__.get("__init__")
    config_cls = find_config_class(cls, task_base)
    if init is None:
        if config_cls is None:
            return
        init = _next_init(cls, config_cls)
    elif config_cls is not None and _needs_annotation(init, config_cls):
        init.__annotations__["config"] = config_cls  # `def __init__(self, config)`: what jsonargparse must read.
    cls.__init__ = typed_config_init(init)  # type: ignore[misc]


def _needs_annotation(init: Any, config_cls: type) -> bool:
    """An `__init__(self, config)` with no annotation, or one naming a base class of the declared config."""
    code = getattr(init, "__code__", None)
    if code is None or "config" not in code.co_varnames[:2]:
        return False
    given = init.__annotations__.get("config")
    return given is None or (isinstance(given, type) and given is not config_cls and issubclass(config_cls, given))


def _next_init(cls: type, config_cls: type) -> Any:
    """An `__init__` whose annotation names the config (jsonargparse reads it) and calls the next one in the MRO,
    which need not be a Task's."""

    def init(self: Any, config: Any) -> None:
        super(cls, self).__init__(config)  # type: ignore[arg-type]  # mypy takes the closure's `cls` for an instance

    init.__annotations__ = {"config": config_cls, "return": None}
    return init
