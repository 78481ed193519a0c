"""The package's layout keeps its imports one way: no cycles, no import hidden in a function to dodge one, and every
module importable on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlfab"
# Backends imported when first used, so `import mlfab` does not pay for them (or fail without them).
LAZY = (
    "wandb",
    "soundfile",
    "moviepy",
    "imageio_ffmpeg",  # moviepy's ffmpeg, for W&B videos.
    "schedulefree",
    "torch.utils.tensorboard",
    "tensorboard.backend",
    "tensorboard.compat",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (`from mlfab.x import y` loads mlfab.x.y when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level_imports(tree: ast.Module) -> list[str]:
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found += imported(node)
        elif isinstance(node, ast.If | ast.Try) and not (isinstance(node, ast.If) and is_type_checking(node)):
            found += [
                m for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom) for m in imported(sub)
            ]
    return found


def function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    found += [(sub.lineno, m) for m in imported(sub)]
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = module_level_imports(ast.parse(path.read_text()))
        # A package's own __init__ is loaded before any of its modules: not an edge of the module's own.
        edges[name] = {t for t in targets if t in MODULES and t != name and t != "mlfab"}
    return edges


@pytest.mark.unit
def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.unit
def test_imports_inside_functions_are_only_lazy_backends() -> None:
    hidden = dict.fromkeys(
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in MODULES.values()
        for line, target in function_level_imports(ast.parse(path.read_text()))
        if not any(target == lazy or target.startswith(lazy + ".") for lazy in LAZY)
    )
    assert not hidden, "move these imports to the top of the module:\n" + "\n".join(hidden)


@pytest.mark.unit
def test_the_cycle_check_can_fail() -> None:
    tree = ast.parse("import mlfab.task\nif TYPE_CHECKING:\n    import mlfab.config\ndef f():\n    import mlfab.run\n")
    assert module_level_imports(tree) == ["mlfab.task"]
    assert function_level_imports(tree) == [(5, "mlfab.run")]


# Imports the third-party packages once, then each mlfab module in a child forked before any mlfab module was loaded.
# Loading torch and Lightning first cannot hide an order problem between mlfab's own modules, and it makes the
# check take seconds instead of minutes (45 fresh interpreters at ~8 s each).
IMPORT_EACH = """
import importlib, os, sys, traceback
for dep in sys.argv[1].split(","):
    try:
        importlib.import_module(dep)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "mlfab"], "mlfab was loaded before the fork"
for name in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
        except BaseException:
            os.write(write, traceback.format_exc()[-1500:].encode())
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        err = pipe.read()
    if os.waitpid(pid, 0)[1] != 0:
        print(f"{name}:\\n{err}")
"""


def third_party_packages() -> list[str]:
    tops = {
        target.split(".")[0]
        for path in MODULES.values()
        for target in module_level_imports(ast.parse(path.read_text()))
        if not any(target == lazy or target.startswith(lazy + ".") for lazy in LAZY)
    }
    return sorted(tops - {"mlfab", "__future__"} - set(sys.stdlib_module_names))


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    """Each module in a process where no other mlfab module was loaded: an import order that only works after
    another module was loaded fails here."""
    cmd = [sys.executable, "-c", IMPORT_EACH, ",".join(third_party_packages()), *sorted(MODULES)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not done.stdout, done.stdout


@pytest.mark.unit
def test_the_import_check_can_fail(tmp_path: Path) -> None:
    """A module that needs another to be loaded first is reported by name."""
    (tmp_path / "needs_other.py").write_text("import sys\nassert 'json' in sys.modules, 'json was not loaded'\n")
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, "yaml", "needs_other"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert done.stdout.startswith("needs_other:") and "json was not loaded" in done.stdout, done.stdout + done.stderr


@pytest.mark.unit
def test_every_user_facing_error_lives_in_errors_and_is_exported() -> None:
    import mlfab
    from mlfab import errors

    defined_elsewhere = [
        f"{path.relative_to(ROOT)}: class {node.name}"
        for path in MODULES.values()
        if path.name != "errors.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id.endswith("Error") for b in node.bases)
    ]
    assert not defined_elsewhere, "define user-facing errors in mlfab/errors.py: " + ", ".join(defined_elsewhere)
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.MlfabError)]
    assert len(classes) >= 8
    assert all(c.__name__ in mlfab.__all__ and getattr(mlfab, c.__name__) is c for c in classes)


@pytest.mark.unit
def test_a_logger_without_write_cannot_be_made() -> None:
    from lightning.pytorch.loggers import Logger

    import mlfab

    class Forgetful(mlfab.MlfabLogger, Logger):
        name = version = "x"

        def log_hyperparams(self, params: object) -> None: ...

        def log_metrics(self, metrics: object, step: object = None) -> None: ...

    with pytest.raises(TypeError, match="abstract method.*write"):
        Forgetful()
