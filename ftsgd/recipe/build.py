"""Turning a merged recipe dict into the frozen dataclasses, every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from ftsgd.errors import RecipeError
from ftsgd.recipe.checks import check_values
from ftsgd.recipe.schema import (
    SECTIONS,
    STAGE_KEY,
    STAGE_SECTIONS,
    TOP_LEVEL_KEYS,
    Checks,
    Recipe,
    StageConfig,
)
from ftsgd.recipe.values import coerce


def _build_section(cls: type, raw: Any, section: str, problems: list[str], base: Any = None) -> Any:
    """The section ``raw`` describes: its keys checked and set on ``base`` (default: the defaults)."""
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a table [{section}], got {raw!r}")
        return cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{section}.{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"{path}: unknown key{hint}")
            continue
        before = len(problems)
        coerced = coerce(value, hints[key], path, problems)
        if len(problems) == before:
            values[key] = coerced
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _build_stages(raw: Any, base: Recipe, problems: list[str]) -> tuple[StageConfig, ...]:
    """The ``[[stage]]`` tables, each resolved against the recipe's own sections (``base``)."""
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        problems.append(f"{STAGE_KEY}: expected [[{STAGE_KEY}]] tables (an array of tables), got {raw!r}")
        return ()
    return tuple(_build_stage(table, f"{STAGE_KEY}.{n}", base, problems) for n, table in enumerate(raw, 1))


def _build_stage(raw: dict[str, Any], path: str, base: Recipe, problems: list[str]) -> StageConfig:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STAGE_SECTIONS:
            values[key] = _build_section(
                STAGE_SECTIONS[key], value, f"{path}.{key}", problems, getattr(base, key)
            )
        elif key == "train" and isinstance(value, dict):
            for extra in sorted(set(value) - {"epochs"}):
                problems.append(
                    f"{path}.train.{extra}: a stage sets only train.epochs; the other train.* keys apply to "
                    "the whole run (set them in [train])"
                )
            if "epochs" in value:
                before = len(problems)
                epochs = coerce(value["epochs"], int, f"{path}.train.epochs", problems)
                values.update({"epochs": epochs} if len(problems) == before else {})
        elif key == "name" and isinstance(value, str):
            values["name"] = value
        else:
            what = (
                "expected a string"
                if key == "name"
                else "expected a table"
                if key == "train"
                else "unknown key"
            )
            problems.append(
                f"{path}.{key}: {what}; a stage may set name, freeze.*, optim.*, schedule.* and train.epochs"
            )
    return StageConfig(
        **{"freeze": base.freeze, "optim": base.optim, "schedule": base.schedule, "epochs": base.train.epochs}
        | values
    )


def _legacy_train_keys(raw: Any, problems: list[str]) -> Any:
    """``train.tensorboard = true``, the spelling before ``train.tracking``: "tensorboard" in the list.

    Recipes and the ``recipe.toml`` of runs written before ``train.tracking`` keep loading (and resuming)
    unchanged; ``false`` adds nothing. The key is gone once read, so a recipe is dumped in one spelling.
    """
    if not isinstance(raw, dict) or "tensorboard" not in raw:
        return raw
    raw = dict(raw)
    on = raw.pop("tensorboard")
    if not isinstance(on, bool):
        problems.append(
            f'train.tensorboard: expected a boolean (the older spelling of train.tracking = ["tensorboard"]), '
            f"got {on!r}"
        )
    elif on:
        tracking = raw.get("tracking", [])
        raw["tracking"] = [*(tracking if isinstance(tracking, list) else [tracking]), "tensorboard"]
    return raw


def recipe_from_dict(raw: dict[str, Any], extra_checks: Checks | None = None) -> Recipe:
    """Validate a raw (merged) recipe dict into a :class:`Recipe`, reporting all problems at once.

    Args:
        raw: The merged recipe (defaults are filled in for absent keys).
        extra_checks: More checks on the built recipe whose problems join this module's own in one
            error; :mod:`ftsgd.validate` passes the ones that need timm or the file system, which this
            module deliberately does not import.
    """
    problems: list[str] = []
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key == STAGE_KEY:
            continue  # built below, on top of the finished sections
        if key in SECTIONS:
            value = _legacy_train_keys(value, problems) if key == "train" else value
            sections[key] = _build_section(SECTIONS[key], value, key, problems)
        elif key in TOP_LEVEL_KEYS:
            if isinstance(value, str):
                top[key] = value
            else:
                problems.append(f"{key}: expected a string, got {value!r}")
        else:
            known = [*SECTIONS, *TOP_LEVEL_KEYS, STAGE_KEY]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            problems.append(f"{key}: unknown key{hint}")
    recipe = Recipe(**top, **sections)
    if STAGE_KEY in raw:
        recipe = dataclasses.replace(recipe, stages=_build_stages(raw[STAGE_KEY], recipe, problems))
    problems.extend(check_values(recipe))
    if extra_checks is not None:
        problems.extend(extra_checks(recipe))
    if problems:
        raise RecipeError(problems)
    return recipe
