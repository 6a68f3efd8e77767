"""A recipe back as TOML or a flat dict, the differences between two, and the key reference."""

from __future__ import annotations

import dataclasses
import itertools
import typing
from typing import Any

from ftsgd.recipe.schema import SECTIONS, STAGE_KEY, STAGE_SECTIONS, TOP_LEVEL_KEYS, Recipe, StageConfig
from ftsgd.recipe.values import toml_key, toml_value, type_name


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain-data copy of a recipe in the shape of its TOML (for JSON and TOML output).

    Stages become a ``stage`` list of tables (``[stage.train] epochs``), present only when there are any,
    so :func:`recipe_from_dict` reads the result back into an equal recipe.
    """
    data = dataclasses.asdict(recipe)
    stages = data.pop("stages")
    if stages:
        data[STAGE_KEY] = [
            {"name": st["name"], **{k: st[k] for k in STAGE_SECTIONS}, "train": {"epochs": st["epochs"]}}
            for st in stages
        ]
    return data


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML; loading it back gives an equal :class:`Recipe`."""
    data = recipe_to_dict(recipe)
    lines = []
    for key in TOP_LEVEL_KEYS:
        lines.append(f"{key} = {toml_value(data[key])}")
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in data[section].items():
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for stage in data.get(STAGE_KEY, []):
        lines += ["", f"[[{STAGE_KEY}]]", f"name = {toml_value(stage['name'])}"]
        for section in (*STAGE_SECTIONS, "train"):
            lines += ["", f"[{STAGE_KEY}.{section}]"]
            lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in stage[section].items()]
    return "\n".join(lines) + "\n"


def recipe_differences(old: Recipe, new: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every key whose value differs, as ``"key.path: old -> new"`` lines, in recipe order.

    ``description`` is never a difference: it changes no run (a reworded built-in recipe must not stop
    ``--resume``).
    """
    ignore = ("description", *ignore)
    a, b = flatten_recipe(recipe_to_dict(old)), flatten_recipe(recipe_to_dict(new))
    return [
        f"{key}: {toml_value(a[key]) if key in a else '(unset)'} -> {toml_value(b[key]) if key in b else '(unset)'}"
        for key in dict.fromkeys([*a, *b])
        if key not in ignore and a.get(key) != b.get(key)
    ]


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Every recipe key as ``(key path, type, default, description)`` for docs and ``recipes keys``."""
    rows = []
    for section, cls in SECTIONS.items():
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    type_name(hints[f.name]),
                    toml_value(getattr(default, f.name)),
                    docs.get(f.name, ""),
                )
            )
    return rows + _stage_key_rows()


def _stage_key_rows() -> list[tuple[str, str, str, str]]:
    """The ``[[stage]]`` keys, documented once for every stage N (numbered from 1)."""
    docs, prefix = _field_docs(StageConfig), f"{STAGE_KEY}.N"
    return [
        (f"{prefix}.name", "string", '""', docs["name"]),
        *[(f"{prefix}.{s}.*", "table", f"the recipe's [{s}]", docs[s]) for s in STAGE_SECTIONS],
        (f"{prefix}.train.epochs", "integer", "train.epochs", docs["epochs"]),
    ]


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) read from the source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - no source available
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def flatten_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``: one level, as recipe keys are spelled.

    Values that are tables themselves (``model.kwargs``) stay whole: they are one recipe key. The
    ``[[stage]]`` tables become ``stage.N.optim.lr`` (N from 1), the spelling ``--set`` takes.
    """
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == STAGE_KEY and isinstance(value, list) and all(isinstance(s, dict) for s in value):
            for n, stage in enumerate(value, 1):
                flat.update({f"{key}.{n}.{k}": v for k, v in flatten_recipe(stage).items()})
        elif isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat
