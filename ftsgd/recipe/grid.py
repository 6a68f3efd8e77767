"""Sweep grids: which recipe keys a sweep may vary and the values given for them."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from typing import Any

from ftsgd.errors import RecipeError
from ftsgd.recipe.schema import SECTIONS, STAGE_KEY, STAGE_SECTIONS, SlurmConfig
from ftsgd.recipe.values import coerce, parse_override, toml_key, toml_value

NOT_GRID_SECTIONS = ("sweep", "slurm")
"""Recipe sections about how runs are scheduled, not what they train: never grid keys."""

SWEEP_KEYS = ("sweep.grid", *(f"slurm.{f.name}" for f in dataclasses.fields(SlurmConfig)))
"""Recipe keys that never change what a run trains: ignored when a run's recipe is compared with another."""


_ONE_SPLIT = (
    "every run of a sweep validates on the same images (the split drawn from one folder of class folders); "
    "set it once for the sweep (--set), or run one sweep per split"
)

GRID_FORBIDDEN = {
    "data.root": "a sweep trains on one dataset (--data)",
    "data.val_fraction": _ONE_SPLIT,
    "data.test_fraction": _ONE_SPLIT,
    "data.split_seed": _ONE_SPLIT,
}


def _grid_label(where: str, key: str) -> str:
    """How a problem names a grid key: ``sweep.grid."optim.lr"`` in a recipe, ``--grid optim.lr`` on the CLI."""
    return f"{where} {key}" if where.startswith("-") else f"{where}.{toml_key(key)}"


def grid_problems(grid: dict[str, Any], where: str = "sweep.grid") -> list[str]:
    """Every problem of a grid: unknown keys, empty or non-list values, wrongly typed or repeated values.

    Each value is checked against its key's type here; the full recipe of each combination is checked
    when a sweep resolves it (cross-key rules such as ``schedule.min_lr < optim.lr``).
    """
    problems: list[str] = []
    for key, values in grid.items():
        label = _grid_label(where, key)
        hint = _grid_key_problem(key)
        if hint:
            problems.append(f"{label}: {hint}")
        elif not isinstance(values, list) or not values:
            problems.append(f"{label}: expected a non-empty list of values, got {values!r}")
        else:
            tp = _grid_key_type(key)
            coerced = [coerce(v, tp, f"{label}[{i}]", problems) for i, v in enumerate(values)]
            seen = [toml_value(v) for v in coerced if v is not None]
            repeated = sorted({v for v in seen if seen.count(v) > 1})
            if repeated:
                problems.append(f"{label}: {', '.join(repeated)} given more than once")
    return problems


def _grid_key_type(key: str) -> Any:
    """The type of a valid grid key's values (``stage.N.section.key`` as its section's key)."""
    if key.startswith(f"{STAGE_KEY}."):
        section, name = key.split(".")[2:]
        return int if section == "train" else typing.get_type_hints(STAGE_SECTIONS[section])[name]
    section, _, name = key.partition(".")
    return typing.get_type_hints(SECTIONS[section])[name]


def _stage_grid_key_problem(key: str) -> str:
    """Why ``stage.N.section.key`` cannot be a grid key (empty when it can); stage names are not taken,
    as the run directories and ``ftsgd report`` spell stage keys by number."""
    parts = key.split(".")
    if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1:
        return f"a stage key is stage.N.SECTION.KEY with N the stage's number from 1, e.g. {STAGE_KEY}.2.optim.lr"
    section, name = parts[2:]
    if section == "train":
        return "" if name == "epochs" else "of [stage.train] a stage sets only epochs"
    if section not in STAGE_SECTIONS:
        return f"a stage overrides only {', '.join(STAGE_SECTIONS)} and train.epochs"
    names = [f.name for f in dataclasses.fields(STAGE_SECTIONS[section])]
    return "" if name in names else f"unknown recipe key {section}.{name}"


def _grid_key_problem(key: str) -> str:
    """Why ``key`` cannot be a grid key (empty when it can)."""
    if key in GRID_FORBIDDEN:
        return f"cannot be a grid key: {GRID_FORBIDDEN[key]}"
    if key.startswith(f"{STAGE_KEY}."):
        return _stage_grid_key_problem(key)
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section) if section not in NOT_GRID_SECTIONS else None
    names = [f.name for f in dataclasses.fields(cls)] if cls else []
    if name in names:
        return ""
    known = [
        f"{s}.{f.name}"
        for s, c in SECTIONS.items()
        if s not in NOT_GRID_SECTIONS
        for f in dataclasses.fields(c)
    ]
    close = difflib.get_close_matches(key, known, n=1)
    return "unknown recipe key" + (
        f" (did you mean {close[0]}?)" if close else " (`ftsgd recipes keys` lists them)"
    )


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """Parse one ``--grid KEY.PATH=V1,V2,...``: values are read as TOML where they can be, else as strings.

    ``optim.lr=1e-4,3e-4`` gives floats, ``data.augment=flip,none`` strings, and lists or tables are
    written as TOML: ``optim.betas=[0.9,0.999],[0.9,0.99]``, ``model.kwargs={img_size=32},{img_size=64}``.
    """
    key, sep, rhs = text.partition("=")
    key = key.strip()
    if not sep or not key or not rhs.strip() or any(c in text for c in "\n\r\x00"):
        raise RecipeError(
            [f"--grid {text!r}: expected KEY.PATH=V1,V2,..., e.g. --grid optim.lr=1e-4,3e-4"], "--grid"
        )
    try:
        values = tomllib.loads(f"v = [{rhs}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [parse_override(f"v={item}")[1] for item in rhs.split(",")]
    return key, values
