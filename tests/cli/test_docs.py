"""The README documents what the code offers (keys, recipes, commands), so the docs cannot drift silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsgd.recipe.dump import describe_keys
from ftsgd.recipe.load import builtin_recipes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
"""The README and the pages of docs/, where keys may be documented too."""


@pytest.mark.parametrize("key", [row[0] for row in describe_keys()])
def test_every_recipe_key_is_documented(key: str) -> None:
    assert f"`{key}`" in DOCS


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_is_documented(name: str) -> None:
    assert f"`{name}`" in README


def test_readme_names_the_two_setup_commands_and_ci_calls_one() -> None:
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
