"""The README and docs/ document what the code offers (keys, recipes, commands), so they cannot drift silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftsgd.recipe.dump import describe_keys
from ftsgd.recipe.load import builtin_recipes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = {page.name: page.read_text() for page in sorted((ROOT / "docs").glob("*.md"))}
ALL_DOCS = README + "".join(DOCS.values())


@pytest.mark.parametrize("key", [row[0] for row in describe_keys()])
def test_every_recipe_key_is_documented(key: str) -> None:
    assert f"`{key}`" in ALL_DOCS


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_is_documented(name: str) -> None:
    assert f"`{name}`" in ALL_DOCS


def test_readme_names_the_two_setup_commands_and_ci_calls_one() -> None:
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves() -> None:
    for name in DOCS:
        assert f"(docs/{name})" in README, f"docs/{name} is not linked from the README"
    for source, text in {"README.md": README, **{f"docs/{n}": t for n, t in DOCS.items()}}.items():
        base = (ROOT / source).parent
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (base / target).is_file(), f"{source} links to {target}, which does not exist"
