"""How this program was started, to tell the user how to run it again and to rerun it inside a Slurm job."""

import sys
from collections.abc import Sequence
from pathlib import Path

from mlfab.errors import SlurmError


def main_module() -> str | None:
    """`examples.mnist` when started as `python -m examples.mnist`, else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.removesuffix(".__main__") if spec is not None and spec.name else None


def command_name() -> str:
    """How the user started this program, for messages: `python -m examples.mnist` or `python train.py`."""
    if Path(sys.argv[0]).name == "mlfab":
        return "mlfab"
    if (module := main_module()) is not None:
        return f"python -m {module}"
    return f"python {Path(sys.argv[0]).name}" if sys.argv and sys.argv[0] else "python my_script.py"


def current_command(argv: Sequence[str]) -> list[str]:
    """The arguments after `python` that start this program again: `-m package.module ...` or `/abs/script.py ...`."""
    if (module := main_module()) is not None:
        return ["-m", module, *argv]
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or not script.is_file():
        raise SlurmError(
            "launcher='slurm' runs this program again inside the Slurm job, but it was not started "
            "from a script or module (an interactive session or `python -c`?). Put the launch call in "
            "a script and run `python my_script.py`, or `python -m my_package.my_module`."
        )
    return [str(script.resolve()), *argv]
