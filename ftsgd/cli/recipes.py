"""``ftsgd recipes``: the built-in recipes, one resolved, and the key reference."""

from __future__ import annotations

import sys

from ftsgd.recipe.dump import describe_keys, recipe_to_dict, recipe_to_toml
from ftsgd.recipe.load import list_recipes, load_recipe
from ftsgd.utils import console


def recipes_list_command(as_json: bool) -> None:
    """``ftsgd recipes``: the built-in recipes and their descriptions."""
    rows = list_recipes()
    if as_json:
        console.print_json([{"name": n, "description": d} for n, d in rows])
    else:
        console.print_table("Built-in recipes", ["recipe", "description"], rows)


def recipes_show_command(name: str, overrides: list[str], as_json: bool) -> None:
    """``ftsgd recipes show``: a recipe fully resolved, as TOML (or JSON).

    The recipe's own checks only (no torch, no timm: it prints in a fraction of a second); whether this timm
    knows the model and the folders exist is checked where it matters, by ``train``, ``sweep`` and ``inspect``.
    """
    recipe = load_recipe(name, overrides)
    if as_json:
        console.print_json(recipe_to_dict(recipe))
    else:
        sys.stdout.write(recipe_to_toml(recipe))


def recipes_keys_command(as_json: bool) -> None:
    """``ftsgd recipes keys``: every recipe key with its type, default and meaning."""
    rows = describe_keys()
    if as_json:
        console.print_json(
            [dict(zip(("key", "type", "default", "description"), r, strict=True)) for r in rows]
        )
    else:
        console.print_table("Recipe keys", ["key", "type", "default", "description"], rows)
