"""The package's shape: one folder per stage of the flow, imports pointing down, short functions and files.

The folders are docs/architecture.md, lowest first. A module may import from its
own folder and from lower folders only (imports inside functions count too); within a folder there is
no cycle. So each stage can be read and tested without the ones above it, and ``ftsgd --help`` or
``ftsgd report`` never pay for torch: no folder's ``__init__.py`` imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ftsgd"

FOLDERS = ["utils", "recipe", "model", "data", "infer", "run", "train", "inspect", "report", "sweep", "cli"]
"""Lowest first. ``model`` and ``data`` never import each other; nor do ``inspect`` and ``report``."""
ROOT_MODULES = {"__init__": -2, "errors": -1, "__main__": len(FOLDERS)}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
LONGER_MODULES = {"train/trainer.py": 900}
"""The Trainer's file reads as one story, the loop; it may be longer, but no longer than this."""


def _floor(module: str) -> int:
    """The floor of a dotted module name under ``ftsgd``."""
    first = module.split(".")[1] if "." in module else "__init__"
    if first in ROOT_MODULES:
        return ROOT_MODULES[first]
    return FOLDERS.index(first)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ftsgd_imports(path: Path) -> set[str]:
    """Dotted names of the ftsgd modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ftsgd" or node.module.startswith("ftsgd."):
                found.add(node.module)
                for alias in node.names:  # `from ftsgd.utils import console` imports a module
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                        found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ftsgd.")}
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_sits_in_a_known_folder() -> None:
    stray = [m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in ROOT_MODULES]
    stray = [m for m in stray if m.split(".")[1] not in FOLDERS]
    deep = [m for m in _modules() if m.count(".") > 2]
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FOLDERS), folders ^ set(FOLDERS)
    assert not stray and not deep, stray + deep


def test_imports_point_down_the_folders() -> None:
    wrong = []
    for name, path in _modules().items():
        for target in sorted(_ftsgd_imports(path)):
            if target == "ftsgd":
                continue  # `from ftsgd import __version__`: the package root imports nothing
            if _floor(target) > _floor(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_within_a_folder() -> None:
    graph = {name: {t for t in _ftsgd_imports(path) if t != name} for name, path in _modules().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, cycles


def test_folder_inits_are_small_and_import_no_torch() -> None:
    """Each folder's ``__init__`` names its public surface; importing all of them loads neither torch nor timm."""
    code = "import sys\n" + "".join(f"import ftsgd.{f}\n" for f in FOLDERS)
    code += "print(sorted(m for m in ('torch', 'timm', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    for folder in FOLDERS:
        assert len((PACKAGE / folder / "__init__.py").read_text().splitlines()) <= 40, folder


def test_functions_fit_on_a_screen() -> None:
    """No function is longer than MAX_FUNCTION_LINES lines of code (its docstring aside)."""
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    n -= first.end_lineno - first.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_modules_hold_one_concern() -> None:
    """No module over MAX_MODULE_LINES lines (the Trainer's file aside, within its own bound)."""
    long = []
    for path in _modules().values():
        rel = str(path.relative_to(PACKAGE))
        n = len(path.read_text().splitlines())
        if n > LONGER_MODULES.get(rel, MAX_MODULE_LINES):
            long.append(f"{rel}: {n} lines")
    assert not long, "\n".join(long)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The walk finds function-local imports and imported modules too (what a cycle hides behind)."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from ftsgd.train.trainer import Trainer\n    import ftsgd.cli.app\n"
        "    from ftsgd.utils import console\n"
    )
    assert _ftsgd_imports(source) == {
        "ftsgd.train.trainer",
        "ftsgd.cli.app",
        "ftsgd.utils",
        "ftsgd.utils.console",
    }
    assert _floor("ftsgd.cli.app") > _floor("ftsgd.train.trainer") > _floor("ftsgd.utils.console")
