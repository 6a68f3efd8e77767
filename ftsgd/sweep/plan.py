"""Planning a sweep: the grid points of each recipe, resolved as ``ftsgd train`` would resolve them."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ftsgd.errors import RecipeError, UsageError
from ftsgd.recipe.dump import flatten_recipe, recipe_to_dict
from ftsgd.recipe.grid import SWEEP_KEYS, grid_problems, parse_grid_option
from ftsgd.recipe.load import builtin_recipes, recipe_grid, resolve_recipe_source
from ftsgd.recipe.schema import DEFAULT_RECIPE, Recipe
from ftsgd.recipe.values import parse_override, toml_literal
from ftsgd.report.selection import SEED_KEY, canonical, check_report_metrics
from ftsgd.run.resume import resolve_train_recipe

MAX_NAME = 200
"""Longest run-directory name written as is; longer ones are cut and end in a hash of the whole name."""


SHORTHANDS = ("model.name", "model.weights")
"""Recipe keys ``--model`` and ``--weights`` set."""


@dataclass(frozen=True)
class SweepOptions:
    """``ftsgd sweep``'s arguments, as parsed by the CLI."""

    data: Path
    out: Path
    recipes: list[str] = field(default_factory=list)
    """``--recipe`` values in order; empty: the default recipe."""
    grids: list[str] = field(default_factory=list)
    """``--grid KEY=V1,V2`` values; each replaces that key's values in every recipe's grid."""
    sets: list[str] = field(default_factory=list)
    model: str | None = None
    weights: Path | None = None
    jobs: int = 1
    devices: str | None = None
    """``--devices 0,1``: the GPUs jobs are pinned to, round-robin (CUDA_VISIBLE_DEVICES values)."""
    print_commands: bool = False
    allow_changed_grid: bool = False
    retry_failed: bool = False
    as_json: bool = False
    png: Path | None = None
    argv: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    """``--metric``: what the report's split columns show."""
    select_by: str = "val.accuracy"
    """``--select-by``: what the report's selection picks best epochs and grid points by."""
    slurm: bool = False
    """``--slurm``: submit the points as a Slurm job array instead of training them here."""
    slurm_opts: list[str] = field(default_factory=list)
    """``--slurm-opt KEY=VALUE`` values (sbatch long options), on top of the recipes' ``[slurm]`` table."""
    wait: bool = False
    """``--wait`` (with ``--slurm``): block until no point is queued or running, then exit as a local sweep."""
    gpus_per_run: int = 1
    """``--gpus-per-run N`` (with ``--slurm``): each point runs under torchrun with N processes."""
    recipe_grids: dict[str, list[str]] = field(default_factory=dict)
    """Not a flag: ``--grid``-style values for one recipe only (keyed by its ``--recipe`` value), on top of
    ``grids``, as if that recipe's ``[sweep]`` grid said them. For callers that give each recipe its own
    grid, e.g. ``ftsgd demo --compare`` (SGD and AdamW learning rates)."""


@dataclass
class PlannedRun:
    """One grid point of one recipe: where it runs and the ``ftsgd train`` arguments that run it."""

    recipe: str
    values: dict[str, Any]
    """The grid keys' values as the resolved recipe holds them."""
    path: Path
    args: list[str]
    """``ftsgd train`` arguments (after ``ftsgd``)."""
    resolved: Recipe
    index: int = 0
    """1-based position in the sweep (progress lines)."""

    @property
    def label(self) -> str:
        return f"{self.recipe} {self.path.name}"

    @property
    def command(self) -> str:
        """The run as a shell command line."""
        return shlex.join(["ftsgd", *self.args])

    @property
    def runnable_command(self) -> str:
        """The run as a command line that works where ``ftsgd`` is not on ``PATH`` (cron, another shell,
        a scheduler's job): this interpreter, by absolute path, running ``-m ftsgd``."""
        return shlex.join([os.path.abspath(sys.executable), "-m", "ftsgd", *self.args])


@dataclass
class PlannedRecipe:
    """One ``--recipe`` of the sweep: its grid and the rest of its resolved recipe (to detect changes)."""

    name: str
    source: str
    grid: dict[str, list[Any]]
    recipe: dict[str, Any]
    """The resolved recipe, flattened, without ``data.root``, the sweep keys and the grid keys."""


@dataclass
class Plan:
    """Everything a sweep runs, resolved and checked; nothing is written yet."""

    data: Path
    out: Path
    recipes: list[PlannedRecipe]
    runs: list[PlannedRun]


def plan_sweep(opts: SweepOptions) -> Plan:
    """Resolve every grid point of every recipe exactly as ``ftsgd train`` will, reporting all problems at once.

    Raises:
        UsageError: Bad options, grids or recipes, with every problem of every run listed.
    """
    check_options(opts)
    cli_grid, problems = parse_cli_grid(opts.grids)
    own = {}
    for source, texts in opts.recipe_grids.items():
        own[source], more = parse_cli_grid(texts)
        problems += [f"--recipe {source}: {p}" for p in more]
    data = opts.data.expanduser().resolve()
    out = opts.out.expanduser().resolve()
    recipes, runs, grid_ok = [], [], not problems
    for source in opts.recipes or [DEFAULT_RECIPE]:
        try:
            if not grid_ok:  # without a usable grid there are no points; still say which recipes are unusable
                recipe_grid(source)
                continue
            planned, points = plan_recipe(source, {**cli_grid, **own.get(source, {})}, opts, data, out)
        except RecipeError as exc:
            problems += [f"--recipe {source}: {p}" for p in exc.problems]
            continue
        recipes.append(planned)
        runs += points
    problems += duplicate_problems(opts.recipes or [DEFAULT_RECIPE], runs)
    problems = list(dict.fromkeys(problems))  # a recipe given twice says its problems once
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UsageError(f"the sweep cannot start ({len(problems)} problem(s); no run was started):\n{lines}")
    for i, run in enumerate(runs, 1):
        run.index = i
    return Plan(data, out, recipes, runs)


def check_options(opts: SweepOptions) -> None:
    """The options that need no recipe: jobs, devices, the plot folder."""
    if opts.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {opts.jobs}")
    check_report_metrics(opts.metric, opts.select_by)
    if opts.devices is not None:
        devices = parse_devices(opts.devices)
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                f"--devices {','.join(devices)}: no CUDA GPU is available here; leave --devices out"
            )
    if opts.png is not None:
        from ftsgd.report.plots import check_plot_dir

        check_plot_dir(opts.png)
    if opts.out.expanduser().exists() and not opts.out.expanduser().is_dir():
        raise UsageError(f"--out {opts.out} exists and is not a directory")


def parse_devices(text: str) -> list[str]:
    """``--devices 0,1,2`` -> ``["0", "1", "2"]`` (GPU indices or UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    devices = [d.strip() for d in text.split(",")]
    if not devices or any(not d or any(c.isspace() for c in d) for d in devices):
        raise UsageError(
            f"--devices {text!r}: expected a comma-separated list of GPUs, e.g. --devices 0,1,2,3"
        )
    return devices


def parse_cli_grid(grids: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """The ``--grid`` options as one grid, and their problems (a key given twice, unknown keys, bad values)."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for text in grids:
        try:
            key, values = parse_grid_option(text)
        except RecipeError as exc:
            problems += exc.problems
            continue
        if key in grid:
            problems.append(f"--grid {key}: given twice; list every value in one --grid {key}=V1,V2,...")
        grid[key] = values
    return grid, problems + grid_problems(grid, where="--grid")


def plan_recipe(
    source: str, cli_grid: dict[str, list[Any]], opts: SweepOptions, data: Path, out: Path
) -> tuple[PlannedRecipe, list[PlannedRun]]:
    """One recipe's grid (its ``[sweep]`` grid with ``--grid`` replacing keys) expanded into runs.

    Raises:
        RecipeError: The recipe cannot be read, it has no grid, a flag sets a grid key, or grid points have
            problems (each problem once, with the runs it concerns).
    """
    name, path = resolve_recipe_source(source)
    child_source = name if builtin_recipes().get(name) == path else str(path.resolve())
    grid = {**recipe_grid(source), **cli_grid}
    keys = sorted(grid, key=lambda k: (k == SEED_KEY, k))
    problems = flag_conflicts(grid, opts)
    if not grid:
        problems.append(
            f"recipe {name} has no grid: give --grid KEY=V1,V2,... or a [sweep] grid in the recipe"
        )
    runs, failures = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)) if grid else []:
        point = dict(zip(keys, combo, strict=True))
        sets = [f"{k}={set_value(v)}" for k, v in point.items()]
        try:
            runs.append(plan_run(name, child_source, point, sets, opts, data, out))
        except RecipeError as exc:
            for problem in exc.problems:
                failures.setdefault(problem, []).append(point)
    problems += point_problems(failures, grid)
    if problems:
        raise RecipeError(problems)
    return PlannedRecipe(name, source, resolved_grid(keys, runs), base_recipe(runs[0].resolved, keys)), runs


def flag_conflicts(grid: dict[str, list[Any]], opts: SweepOptions) -> list[str]:
    """``--set``/``--model``/``--weights`` must not set a grid key or the sweep's own keys."""
    given = [(f"--set {text}", ".".join(parse_override(text)[0])) for text in opts.sets]
    given += [(f"--model {opts.model}", "model.name")] if opts.model else []
    given += [(f"--weights {opts.weights}", "model.weights")] if opts.weights else []
    problems = []
    for flag, key in given:
        if key.split(".")[0] == "sweep":
            problems.append(f"{flag}: the grid is set with --grid KEY=V1,V2,... (or a recipe's [sweep] grid)")
        elif key in grid:
            values = ", ".join(toml_literal(v) for v in grid[key])
            problems.append(
                f"{flag}: {key} is a grid key of this sweep ({values}); to try one value use --grid {key}=VALUE"
            )
    return problems


def plan_run(
    name: str, source: str, point: dict[str, Any], sets: list[str], opts: SweepOptions, data: Path, out: Path
) -> PlannedRun:
    """Resolve one grid point exactly as ``ftsgd train`` resolves its command line."""
    shorthands = [f"model.name={json.dumps(opts.model)}"] if opts.model else []
    weights = opts.weights.expanduser().resolve() if opts.weights else None
    shorthands += [f"model.weights={json.dumps(str(weights))}"] if weights else []
    resolved = resolve_train_recipe(source, [*opts.sets, *sets, *shorthands], data)
    flat = flatten_recipe(recipe_to_dict(resolved))
    values = {k: flat[k] for k in point}
    path = out / dir_name(name) / dir_name(",".join(f"{k}={value_name(v)}" for k, v in values.items()))
    args = ["train", "--data", str(data), "--out", str(path), "--recipe", source]
    args += ["--model", opts.model] if opts.model else []
    args += ["--weights", str(weights)] if weights else []
    for text in [*opts.sets, *sets]:
        args += ["--set", text]
    return PlannedRun(name, values, path, [*args, "--resume", "--quiet"], resolved)


def point_problems(failures: dict[str, list[dict[str, Any]]], grid: dict[str, list[Any]]) -> list[str]:
    """Each problem once, with the grid points it concerns: ``every grid point``, ``every grid point with
    train.batch_size=0`` when those are exactly the points it has, else the first few points."""
    lines = []
    for problem, points in failures.items():
        common = {k: v for k, v in points[0].items() if all(canonical(p[k]) == canonical(v) for p in points)}
        if len(points) == math.prod(len(v) for k, v in grid.items() if k not in common):
            shared = ", ".join(f"{k}={toml_literal(v)}" for k, v in common.items() if len(grid[k]) > 1)
            where = f"every grid point with {shared}" if shared else "every grid point"
        else:
            labels = [",".join(f"{k}={toml_literal(v)}" for k, v in p.items()) for p in points]
            where = "; ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        lines.append(f"{problem} ({where})")
    return lines


def resolved_grid(keys: list[str], runs: list[PlannedRun]) -> dict[str, list[Any]]:
    """Each grid key's distinct values as the resolved recipes hold them, in grid order."""
    grid: dict[str, list[Any]] = {}
    for key in keys:
        seen: dict[str, Any] = {}
        for run in runs:
            seen.setdefault(canonical(run.values[key]), run.values[key])
        grid[key] = list(seen.values())
    return grid


def base_recipe(recipe: Recipe, keys: list[str]) -> dict[str, Any]:
    """The resolved recipe flattened, without what a sweep varies or ignores (to compare two sweeps)."""
    flat = flatten_recipe(recipe_to_dict(recipe))
    skip = {"data.root", *SWEEP_KEYS, *keys}
    return {k: v for k, v in flat.items() if k not in skip}


def duplicate_problems(sources: list[str], runs: list[PlannedRun]) -> list[str]:
    """Two recipes with one name, or two grid points in one run directory."""
    names = []
    for source in sources:
        with contextlib.suppress(RecipeError):  # reported with the recipe's other problems
            names.append(resolve_recipe_source(source)[0])
    problems = [
        f"--recipe: two recipes are named {name}; their runs would share OUT/{name}/ (rename one file)"
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    paths = [r.path for r in runs]
    for path in sorted({p for p in paths if paths.count(p) > 1}):
        problems.append(f"two grid points would train in {path}: give each value once")
    return problems


def value_name(value: Any) -> str:
    """A grid value as it appears in a run directory's name: ``0.0001``, ``3e-05``, ``true``, ``flip``,
    ``[0.9,0.99]``, ``{img_size=32}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(value_name(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={value_name(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def set_value(value: Any) -> str:
    """``VALUE`` of ``--set KEY=VALUE``: TOML, but a string that reads back as itself goes unquoted (``flip``)."""
    if isinstance(value, str) and parse_override(f"v={value}")[1] == value and value.strip() == value:
        return value
    return toml_literal(value)


def dir_name(text: str) -> str:
    """``text`` made a safe, stable folder name: characters other than letters, digits and ``._-+=,{}[]``
    percent-encoded (``/`` in a value never makes a folder), a long name cut and ended with a hash."""
    safe = quote(text, safe="+=,{}[]")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    if len(safe) > MAX_NAME:
        safe = safe[: MAX_NAME - 17] + "~" + hashlib.sha256(safe.encode()).hexdigest()[:16]
    return safe
