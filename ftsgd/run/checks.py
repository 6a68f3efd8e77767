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

from ftsgd.data.transforms import timm_auto_augment
from ftsgd.errors import WeightsError
from ftsgd.model.build import unknown_model_error
from ftsgd.model.optim import moment_arg_problems, optimizer_names, optimizer_package
from ftsgd.model.weights import resolve_weights_path
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import STAGE_KEY, DataConfig, Recipe

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
    problems.extend(_auto_augment_problems(recipe.data))
    return problems


def _optimizer_problems(recipe: Recipe) -> list[str]:
    """``optim.name`` values (the recipe's and each stage's) that neither torch nor timm knows, and
    ``optim.betas``/``optim.eps`` that the named optimizer would ignore."""
    known = optimizer_names()
    named = [("optim", recipe.optim)]
    named += [(f"{STAGE_KEY}.{n}.optim", s.optim) for n, s in enumerate(recipe.stages, 1)]
    out = []
    for key, cfg in named:
        if key != "optim" and cfg == recipe.optim:
            continue  # the recipe's own optimizer, reported once as optim.*
        if cfg.name.lower() in known:
            prefix = key.removesuffix("optim")
            out += [prefix + problem for problem in moment_arg_problems(cfg)]
            continue
        close = difflib.get_close_matches(cfg.name.lower(), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        out.append(
            f"{key}.name: unknown optimizer {cfg.name!r}; {hint}(sgd, adamw, or a timm optimizer name)"
        )
    return out


_PACKAGE_HINTS = {
    "bitsandbytes": "pip install bitsandbytes",
    "apex": "NVIDIA apex, built from source (https://github.com/NVIDIA/apex)",
}
"""How to install the optional packages timm's optimizer registry names."""


def _missing_packages(recipe: Recipe) -> list[str]:
    """Optional packages the recipe needs that are not installed (found before any work is done)."""
    problems = []
    if recipe.train.tensorboard and not _importable("tensorboard"):
        problems.append(
            "train.tensorboard: needs the tensorboard package, which is not installed: "
            "pip install 'ftsgd[tensorboard]' (or pip install tensorboard), or set train.tensorboard = false"
        )
    package = optimizer_package(recipe.optim.name)
    if package is not None and not _importable(package):
        hint = _PACKAGE_HINTS.get(package, f"pip install {package}")
        problems.append(
            f"optim.name: {recipe.optim.name!r} is an optimizer of the {package} package, which is not "
            f"installed: {hint} (timm also needs a CUDA GPU for it); or choose another optim.name"
        )
    elif package is not None and recipe.train.device == "cpu":
        problems.append(
            f'optim.name: {recipe.optim.name!r} ({package}) needs a CUDA GPU, but train.device = "cpu"'
        )
    return problems


def _auto_augment_problems(d: DataConfig) -> list[str]:
    """``data.auto_augment`` must be a policy timm can parse (checked by building it on a tiny input)."""
    policy = timm_auto_augment(d.auto_augment)
    if policy is None:
        return []
    from timm.data import create_transform

    try:
        create_transform(input_size=(3, 32, 32), is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        return [
            f"data.auto_augment: timm cannot read {d.auto_augment!r} ({exc or type(exc).__name__}); use e.g. "
            '"rand-m9-mstd0.5" (RandAugment), "trivialaugment", "augmix-m5-w4-d2" (AugMix) or "original" '
            "(AutoAugment)"
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
