"""Recipe checks that need timm or the file system, merged with the recipe's own into one error.

:mod:`ftsgd.recipe` validates what a recipe says on its own (types, ranges, conflicting keys) and
imports neither timm nor anything that touches the disk, so it stays fast and testable. Whether the
model name exists in this timm, whether the optimizer is in timm's registry and whether the named
files and folders exist can only be answered here; :func:`load_checked_recipe` runs both kinds of
check so a user still sees every problem of a recipe in one message.
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

from ftsgd.errors import WeightsError
from ftsgd.models import unknown_model_error
from ftsgd.optim import optimizer_names
from ftsgd.recipe import STAGE_KEY, DataConfig, Recipe, load_recipe
from ftsgd.weights import resolve_weights_path

__all__ = ["environment_problems", "load_checked_recipe"]


def load_checked_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """:func:`ftsgd.recipe.load_recipe` plus :func:`environment_problems`, all reported at once.

    Raises:
        RecipeError: listing every problem found, each naming its key path.
    """
    return load_recipe(name_or_path, overrides, extra_checks=environment_problems)


def environment_problems(recipe: Recipe) -> list[str]:
    """Problems with the model name, the optimizer name, the weights file and the dataset folders."""
    problems: list[str] = []
    m = recipe.model
    if m.weights and not Path(m.weights).expanduser().exists():
        problems.append(f"model.weights: file not found: {m.weights}")
    elif m.weights:
        try:
            path = resolve_weights_path(m.weights)  # a folder must hold a weights file
        except WeightsError as exc:
            problems.append(f"model.weights: {exc}")
        else:
            if not os.access(path, os.R_OK):
                problems.append(f"model.weights: {path} is not readable (permission denied)")
    name = m.name.strip()
    if name and not name.startswith(("hf-hub:", "local-dir:")):
        import timm

        if not timm.is_model(name):
            problems.append(f"model.name: {unknown_model_error(name)}")
    problems.extend(_optimizer_problems(recipe))
    problems.extend(_data_path_problems(recipe.data))
    problems.extend(_missing_packages(recipe))
    return problems


def _optimizer_problems(recipe: Recipe) -> list[str]:
    """``optim.name`` values (the recipe's and each stage's) that neither torch nor timm knows."""
    known = optimizer_names()
    named = [("optim.name", recipe.optim.name)]
    named += [(f"{STAGE_KEY}.{n}.optim.name", s.optim.name) for n, s in enumerate(recipe.stages, 1)]
    out = []
    for key, name in named:
        if name.lower() in known or (key != "optim.name" and name == recipe.optim.name):
            continue
        close = difflib.get_close_matches(name.lower(), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        out.append(f"{key}: unknown optimizer {name!r}; {hint}(sgd, adamw, or a timm optimizer name)")
    return out


def _missing_packages(recipe: Recipe) -> list[str]:
    """Optional packages the recipe needs that are not installed (found before any work is done)."""
    if recipe.train.tensorboard and not _importable("tensorboard"):
        return [
            "train.tensorboard: needs the tensorboard package, which is not installed: "
            "pip install 'ftsgd[tensorboard]' (or pip install tensorboard), or set train.tensorboard = false"
        ]
    return []


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _data_path_problems(d: DataConfig) -> list[str]:
    """Dataset folders named in the recipe that do not exist, each under its own key."""
    if not d.root:
        return []
    root = Path(d.root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        return [f"data.root: dataset folder {root} {what} (--data)"]
    out = []
    entries = [("data.train", d.train), ("data.val", d.val)]
    entries += [(f"data.eval_splits[{i}]", entry) for i, entry in enumerate(d.eval_splits)]
    for key, entry in entries:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else root / path
        if entry and not path.is_dir():
            out.append(f"{key}: split folder {path} does not exist")
    return out
