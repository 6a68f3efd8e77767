"""The package's shape: modules import in one direction, by declared layers, and functions stay short.

The layers are the README's "How the code is laid out", lowest first. A module may import only from
lower layers (imports inside functions count too), so there is no import cycle and each concern can be
read and tested without the ones above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ftsgd"

LAYERS: list[set[str]] = [
    {"__init__", "errors", "synthetic"},
    {"fileio", "collect"},
    {"console", "selection", "scancache"},
    {"recipe", "plots"},
    {"device", "report"},
    {"distributed"},
    {"weights"},
    {"hub"},
    {"models", "layers"},
    {"freeze", "optim", "data", "parallel"},
    {"validate", "prepare", "fingerprint", "regularisation"},
    {"evaluate", "memory", "diagnose", "tracking"},
    {"export", "inspection"},
    {"rundir", "predict", "onnx_export"},
    {"trainer"},
    {"compare"},
    {"commands"},
    {"sweep"},
    {"cli"},
    {"__main__"},
]
MAX_FUNCTION_LINES = 60


def _layer_of() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _ftsgd_imports(path: Path) -> set[str]:
    """Names of the ftsgd modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ftsgd":
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
                found.add("__init__")
            elif node.module.startswith("ftsgd."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ftsgd.")}
    return found


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(_layer_of()), modules ^ set(_layer_of())


def test_imports_point_down_the_layers() -> None:
    layer = _layer_of()
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target in sorted(_ftsgd_imports(path) - {path.stem}):
            if target == "__init__" and path.stem != "__init__":
                continue  # `from ftsgd import __version__`: the package root imports nothing
            if layer[target] >= layer[path.stem]:
                wrong.append(
                    f"{path.stem} (layer {layer[path.stem]}) imports {target} (layer {layer[target]})"
                )
    assert not wrong, "\n".join(wrong)


def test_functions_fit_on_a_screen() -> None:
    """No function is longer than MAX_FUNCTION_LINES lines of code (its docstring aside)."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    n -= first.end_lineno - first.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The walk finds function-local imports too (what a cycle hides behind)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ftsgd.trainer import Trainer\n    import ftsgd.cli\n")
    assert _ftsgd_imports(source) == {"trainer", "cli"}
