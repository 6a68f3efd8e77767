"""Reading recipes: built-in names and files, ``base`` chains, ``--set`` overrides."""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from ftsgd.errors import RecipeError
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.grid import grid_problems
from ftsgd.recipe.schema import MAX_BASE_DEPTH, STAGE_KEY, STAGE_SECTIONS, Checks, Recipe, flatten_grid
from ftsgd.recipe.values import parse_override


def builtin_recipe_dir() -> Path:
    """Folder holding the shipped recipes.

    A wheel carries them inside the package (``ftsgd/recipes``); a source checkout or an editable
    install keeps them in the repository's top-level ``recipes/``.
    """
    packaged = resources.files("ftsgd") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """Map each built-in recipe name to its file."""
    folder = builtin_recipe_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def list_recipes() -> list[tuple[str, str]]:
    """Built-in recipes as ``(name, description)`` pairs, sorted by name."""
    out = []
    for name, path in builtin_recipes().items():
        raw = _read_toml(path, name)
        out.append((name, str(raw.get("description", ""))))
    return out


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{label}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:  # UTF-16 (a BOM) or another encoding: TOML is UTF-8
        raise RecipeError(
            [
                f"{label}: {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 2]!r}); "
                "TOML files are UTF-8: save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8"
            ]
        ) from None
    except RecursionError:
        raise RecipeError([f"{label}: {path} nests tables or arrays too deeply to read"]) from None
    except OSError as exc:
        raise RecipeError([f"{label}: cannot read {path}: {exc.strerror}"]) from None


def resolve_recipe_source(name_or_path: str) -> tuple[str, Path]:
    """Turn ``--recipe`` into ``(name, file)``: a built-in name, or a path to a TOML file."""
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return name_or_path, builtins[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.stem, path
    hint = ""
    close = difflib.get_close_matches(name_or_path, list(builtins), n=3)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    raise RecipeError(
        [
            f"recipe '{name_or_path}' is neither a built-in recipe nor an existing file{hint} "
            f"(built-ins: {', '.join(builtins)}; `ftsgd recipes` lists them)"
        ]
    )


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe dict (before validation, so they are checked too).

    ``stage.N.section.key`` (``N`` counted from 1, or the stage's ``name``) sets a key inside the N-th
    ``[[stage]]`` table; ``stage=[...]`` replaces the whole list.
    """
    out = _deep_merge({}, raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        if parts[0] == STAGE_KEY and len(parts) > 1:
            node, parts = _stage_table(out, parts, text), parts[2:]
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            else:
                child = dict(child)
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _stage_table(raw: dict[str, Any], parts: list[str], text: str) -> dict[str, Any]:
    """A copy of the ``[[stage]]`` table ``--set stage.N...`` addresses, put in place of the original."""
    stages = raw.get(STAGE_KEY)
    if not isinstance(stages, list) or not stages:
        raise RecipeError(
            [f"--set {text!r}: the recipe has no [[stage]] tables (stages: `ftsgd recipes show NAME`)"],
            "--set",
        )
    if len(parts) < 3:
        raise RecipeError(
            [f"--set {text!r}: name a key inside the stage, e.g. --set {STAGE_KEY}.{parts[1]}.optim.lr=1e-4"],
            "--set",
        )
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    key = parts[1]
    index = int(key) - 1 if key.isdigit() else names.index(key) if key in names else -1
    if not 0 <= index < len(stages) or not isinstance(stages[index], dict):
        known = ", ".join(f"{i}" + (f" ({n})" if n else "") for i, n in enumerate(names, 1))
        raise RecipeError([f"--set {text!r}: no stage {key!r}; the recipe's stages: {known}"], "--set")
    stages = list(stages)
    stages[index] = _deep_merge({}, stages[index])
    raw[STAGE_KEY] = stages
    return stages[index]


def _shadowed_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """``--set`` values of top-level keys that every stage sets itself, so they would change nothing."""
    stages = raw.get(STAGE_KEY)
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        return []
    problems = []
    for text in overrides:
        parts, _ = parse_override(text)
        if len(parts) != 2 or not (parts[0] in STAGE_SECTIONS or parts == ["train", "epochs"]):
            continue
        if all(isinstance(s.get(parts[0]), dict) and parts[1] in s[parts[0]] for s in stages):
            problems.append(
                f"--set {text}: every [[stage]] sets {parts[0]}.{parts[1]} itself, so this would change "
                f"nothing; set it per stage, e.g. --set {STAGE_KEY}.1.{parts[0]}.{parts[1]}=..."
            )
    return problems


def load_raw(name_or_path: str | None, _chain: tuple[Path, ...] = ()) -> tuple[str, dict[str, Any]]:
    """Read a recipe, and the recipes behind it through ``base``, into one raw dict.

    ``base`` names a built-in recipe, or another recipe file by a path relative to the including
    file's folder. ``_chain`` holds the files already being read, to report a cycle instead of
    recursing forever.
    """
    if not name_or_path:
        return "custom", {}
    name, path = resolve_recipe_source(name_or_path)
    raw = _read_toml(path, str(path))
    base = raw.get("base")
    if isinstance(base, str) and base:
        chain = (*_chain, path.resolve())
        source = _base_source(base, path, chain)
        _, base_raw = load_raw(source, chain)
        base_raw.pop("description", None)
        base_raw.pop("name", None)
        raw = _deep_merge(base_raw, raw)
        raw["base"] = source
    raw.setdefault("name", name)
    return name, raw


def _base_source(base: str, including: Path, chain: tuple[Path, ...]) -> str:
    """What ``base = "..."`` in ``including`` refers to: a built-in name, or an absolute file path.

    Raises:
        RecipeError: the file does not exist, it is already in ``chain`` (a cycle), or the chain of
            bases is longer than :data:`MAX_BASE_DEPTH`.
    """
    builtins = builtin_recipes()
    target = builtins.get(base)
    if target is None:
        target = (including.parent / Path(base).expanduser()).resolve()
        if not target.is_file():
            close = difflib.get_close_matches(base, list(builtins), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RecipeError(
                [
                    f"base: '{base}' is not a built-in recipe{hint or '.'} Nor is it a recipe file: {target} "
                    f"does not exist (a path in base is relative to the folder of {including})"
                ]
            )
    shown = " -> ".join(str(p) for p in (*chain, target.resolve()))
    if target.resolve() in chain:
        raise RecipeError([f"base: recipe cycle: {shown}"])
    if len(chain) > MAX_BASE_DEPTH:
        raise RecipeError([f"base: more than {MAX_BASE_DEPTH} recipes behind one another: {shown}"])
    return base if base in builtins else str(target)


def load_recipe(
    name_or_path: str | None = None, overrides: list[str] | None = None, extra_checks: Checks | None = None
) -> Recipe:
    """Load, merge, override and validate a recipe.

    Args:
        name_or_path: a built-in recipe name, a path to a TOML file, or None for the defaults.
        overrides: ``key.path=value`` strings from ``--set`` (and shorthands like ``--model``).
        extra_checks: see :func:`recipe_from_dict`.

    Raises:
        RecipeError: listing every problem found, each naming its key path.
    """
    _, raw = load_raw(name_or_path)
    raw = apply_overrides(raw, overrides or [])
    shadowed = _shadowed_overrides(raw, overrides or [])
    try:
        recipe = recipe_from_dict(raw, extra_checks)
    except RecipeError as exc:
        raise RecipeError([*shadowed, *exc.problems]) from None
    if shadowed:
        raise RecipeError(shadowed)
    return recipe


def recipe_grid(name_or_path: str) -> dict[str, list[Any]]:
    """The ``[sweep]`` grid a recipe (or the built-in it names as ``base``) carries, checked.

    Raises:
        RecipeError: the recipe cannot be read, or its grid has problems (each with its key path).
    """
    _, raw = load_raw(name_or_path)
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise RecipeError([f"sweep: expected a table [sweep], got {sweep!r}"], name_or_path)
    grid = sweep.get("grid", {})
    if not isinstance(grid, dict):
        raise RecipeError([f"sweep.grid: expected a table of key = [values], got {grid!r}"], name_or_path)
    flat = flatten_grid(grid)
    problems = grid_problems(flat)
    if problems:
        raise RecipeError(problems, name_or_path)
    return flat
