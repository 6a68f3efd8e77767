"""The README (and its docs/ pages) documents what the code offers (keys, recipes, commands), so the docs cannot drift silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsgd.recipe.dump import describe_keys
from ftsgd.recipe.load import builtin_recipes

ROOT = Path(__file__).resolve().parents[2]
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
"""The README and the pages under docs/ it links to."""


@pytest.mark.parametrize("key", [row[0] for row in describe_keys()])
def test_every_recipe_key_is_documented(key: str) -> None:
    assert f"`{key}`" in README


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_is_documented(name: str) -> None:
    assert f"`{name}`" in README


def test_readme_names_the_two_setup_commands_and_ci_calls_one() -> None:
    assert "make demo" in README and "make test" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci
