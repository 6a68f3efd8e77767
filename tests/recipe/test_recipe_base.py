"""``base = "..."``: a built-in recipe by name, or another recipe file relative to the including file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsgd.errors import RecipeError
from ftsgd.recipe.dump import recipe_to_toml
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import MAX_BASE_DEPTH


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_names_a_file_relative_to_the_including_file(tmp_path: Path, monkeypatch) -> None:
    common = write(tmp_path / "common.toml", 'base = "sgd"\n[optim]\nlr = 3e-3\n[train]\nepochs = 4\n')
    mine = write(tmp_path / "exp" / "mine.toml", 'base = "../common.toml"\n[train]\nepochs = 7\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the including file, not to where ftsgd runs
    r = load_recipe(str(mine))
    assert r.name == "mine" and r.base == str(common.resolve())
    assert r.optim.lr == 3e-3 and r.train.epochs == 7
    assert r.optim.momentum == 0.9 and r.freeze.policy == "none"  # from the built-in behind common.toml
    # a resolved recipe (what a run directory keeps) loads back to the same recipe from anywhere
    resolved = write(tmp_path / "run" / "recipe.toml", recipe_to_toml(r))
    assert load_recipe(str(resolved)) == r


def test_builtin_names_still_work_and_win(tmp_path: Path) -> None:
    write(tmp_path / "sgd", "[optim]\nlr = 9.0\n")  # a file named like a built-in is not taken
    mine = write(tmp_path / "mine.toml", 'base = "sgd"\n')
    assert load_recipe(str(mine)).optim.lr == 1e-3
    assert load_recipe(str(write(tmp_path / "own.toml", 'base = "./sgd"\n'))).optim.lr == 9.0


def test_a_cycle_is_reported(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'base = "sub/b.toml"\n')
    write(tmp_path / "sub" / "b.toml", 'base = "../a.toml"\n')
    with pytest.raises(RecipeError) as exc:
        load_recipe(str(a))
    (problem,) = exc.value.problems
    assert problem == (
        f"base: recipe cycle: {a.resolve()} -> {(tmp_path / 'sub' / 'b.toml').resolve()} -> {a.resolve()}"
    )
    itself = write(tmp_path / "self.toml", 'base = "self.toml"\n')
    with pytest.raises(RecipeError, match="recipe cycle"):
        load_recipe(str(itself))


def test_the_chain_of_bases_is_bounded(tmp_path: Path) -> None:
    for i in range(MAX_BASE_DEPTH + 2):
        write(tmp_path / f"r{i}.toml", f'base = "r{i + 1}.toml"\n' if i < MAX_BASE_DEPTH + 1 else "")
    with pytest.raises(RecipeError, match=f"base: more than {MAX_BASE_DEPTH} recipes behind one another"):
        load_recipe(str(tmp_path / "r0.toml"))
    assert load_recipe(str(tmp_path / "r2.toml")).base == str((tmp_path / "r3.toml").resolve())


def test_a_missing_base_says_where_it_looked(tmp_path: Path) -> None:
    mine = write(tmp_path / "exp" / "mine.toml", 'base = "comon.toml"\n')
    with pytest.raises(RecipeError) as exc:
        load_recipe(str(mine))
    assert exc.value.problems == [
        f"base: 'comon.toml' is not a built-in recipe. Nor is it a recipe file: "
        f"{(tmp_path / 'exp' / 'comon.toml').resolve()} does not exist (a path in base is relative to the "
        f"folder of {mine})"
    ]
