"""``ftsgd sweep``: the paper's tuning protocol as one command, resumable and safe to rerun.

A sweep is a grid of recipe values (``--grid`` or a recipe's ``[sweep]`` table) expanded for each
``--recipe``; every combination is an ordinary run directory ``OUT/<recipe>/<key=value,...>/`` trained by
``ftsgd train ... --resume --quiet`` in its own process, so each run can be inspected, evaluated or resumed
on its own and the sweep itself holds no state a run needs. ``OUT/sweep.json`` records what the sweep was
asked (data, recipes, grids), each run's status and results, and the paper's selection
(:func:`ftsgd.selection.build_report`); the run directories stay the truth, so a sweep killed at any moment
is continued by running the same command again.

Everything that can be checked is checked before any run starts: every grid point's recipe is resolved
exactly as ``ftsgd train`` would resolve it, every existing run directory must hold the recipe this sweep
would train in it, and a changed grid, ``--set``, ``--recipe`` or ``--data`` into the same ``--out`` is
refused unless ``--allow-changed-grid`` says it is meant.

Each run is a subprocess, also with ``--jobs 1``: a crash, a leak or the GPU memory of one run never reaches
the next, and ``--jobs 1`` and ``--jobs N`` run the very same processes. With several jobs each one gets
its own GPU (``CUDA_VISIBLE_DEVICES``, round-robin over ``--devices``) and its own share of the CPUs
(affinity and ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from ftsgd import console
from ftsgd.collect import BROKEN, RUN_MARKERS, find_run_dirs, flatten_recipe, read_run, read_runs
from ftsgd.commands import resolve_train_recipe
from ftsgd.errors import FtsgdError, Interrupted, RecipeError, RunError, UsageError, first_line
from ftsgd.fileio import atomic_write_text, jsonable
from ftsgd.recipe import (
    DEFAULT_RECIPE,
    SWEEP_KEYS,
    Recipe,
    builtin_recipes,
    grid_problems,
    parse_grid_option,
    parse_override,
    recipe_differences,
    recipe_grid,
    recipe_to_dict,
    resolve_recipe_source,
    toml_literal,
)
from ftsgd.report import human_seconds, print_terminal
from ftsgd.rundir import RunDir, lock_holder, locked
from ftsgd.selection import SEED_KEY, Report, build_report, canonical, order_key

__all__ = ["SWEEP_FILE", "SweepOptions", "sweep_command"]

SWEEP_FILE = "sweep.json"
LOG_DIR = "logs"
FORMAT = 1
PENDING, RUNNING, FINISHED, FAILED, INTERRUPTED = "pending", "running", "finished", "failed", "interrupted"
STATUSES = (PENDING, RUNNING, FINISHED, FAILED, INTERRUPTED)
INCOMPLETE = "incomplete"
"""A sweep's state when runs are left that another process was training (they were not started twice)."""
POLL_S = 0.2
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


@dataclass
class RunRecord:
    """A run's status in ``sweep.json``."""

    status: str = PENDING
    exit_code: int | None = None
    error: str | None = None
    """The failure's first line (from the run's log)."""
    started: str | None = None
    ended: str | None = None
    pid: int | None = None
    """The training process while it runs."""
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class Slot:
    """Where one of ``--jobs`` concurrent runs executes: its GPU, CPUs and thread count."""

    index: int
    device: str | None
    cpus: tuple[int, ...]
    """CPU affinity (empty: inherit the sweep's)."""
    threads: int


@dataclass
class Active:
    """A run being trained by a child process."""

    run: PlannedRun
    slot: Slot
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]
    offset: int
    """Where this attempt's output starts in the log."""


@dataclass
class Stop:
    """SIGINT/SIGTERM received by the sweep: the last signal, how many came and how many were passed on."""

    signum: int = 0
    count: int = 0
    forwarded: int = 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.signum = signum
        self.count += 1


@dataclass
class Sweep:
    """A sweep in progress: the plan, each run's record, and ``sweep.json`` written from them."""

    plan: Plan
    opts: SweepOptions
    records: dict[Path, RunRecord]
    outside: list[Path]
    state: str = RUNNING
    report: Report | None = None
    plots: list[Path] = field(default_factory=list)

    def write(self) -> None:
        """Write ``sweep.json`` atomically."""
        text = json.dumps(jsonable(sweep_document(self)), indent=2) + "\n"
        atomic_write_text(self.plan.out / SWEEP_FILE, text)

    def finish_run(self, run: PlannedRun, record: RunRecord) -> None:
        """Record a run's new status; the selection is redone when a run finished or failed."""
        self.records[run.path] = record
        if record.status in (FINISHED, FAILED):
            self.report = collect_sweep_report(self.plan, self.records)
        self.write()


# ------------------------------------------------------------------------------------------ command


def sweep_command(opts: SweepOptions) -> dict[str, Any]:
    """``ftsgd sweep``: plan and check every run, then train what is not finished, then report.

    Returns:
        ``sweep.json``'s content (or, with ``--print-commands``, the commands printed).

    Raises:
        UsageError: Bad usage, any grid point's recipe, a changed grid or a run directory holding another
            recipe; all found before any run starts.
        RunError: Some runs failed (the others were trained); exit 1.
        Interrupted: SIGINT/SIGTERM stopped the sweep after its running runs stopped (saving checkpoints).
    """
    plan = plan_sweep(opts)
    if opts.print_commands:
        check_out_dir(plan, read_previous(plan.out), opts.allow_changed_grid)
        return print_pending_commands(plan, opts.as_json)
    with locked(plan.out, "sweep directory"):
        previous = read_previous(plan.out)
        check_out_dir(plan, previous, opts.allow_changed_grid)
        sweep = Sweep(plan, opts, initial_records(plan, previous, opts.retry_failed), outside_grid(plan))
        sweep.report = collect_sweep_report(plan, sweep.records)
        sweep.write()
        announce(sweep)
        stop = execute(sweep, make_slots(opts))
        return conclude(sweep, stop)


def conclude(sweep: Sweep, stop: Stop) -> dict[str, Any]:
    """Write the final ``sweep.json`` and plots, print the report, and raise for failures or a stop."""
    counts = status_counts(sweep)
    left = counts[PENDING] + counts[INTERRUPTED]
    sweep.state = (
        INTERRUPTED if stop.count else FAILED if counts[FAILED] else INCOMPLETE if left else FINISHED
    )
    sweep.report = collect_sweep_report(sweep.plan, sweep.records)
    if sweep.opts.png is not None and sweep.report is not None:
        from ftsgd.plots import write_plots

        sweep.plots = write_plots(sweep.report, sweep.opts.png)
    sweep.write()
    document = sweep_document(sweep)
    if sweep.opts.as_json:
        console.print_json(document)
    else:
        print_sweep_report(sweep)
    if stop.count:
        name = signal.Signals(stop.signum).name
        raise Interrupted(
            f"sweep interrupted by {name}: its running runs were stopped (a run stopped while training saves "
            f"its checkpoint); run the same command again to continue ({counts[FINISHED]} of "
            f"{len(sweep.plan.runs)} runs finished)",
            stop.signum,
        )
    if counts[FAILED]:
        raise RunError(failure_summary(sweep))
    return document


# ------------------------------------------------------------------------------------------ planning


def plan_sweep(opts: SweepOptions) -> Plan:
    """Resolve every grid point of every recipe exactly as ``ftsgd train`` will, reporting all problems at once.

    Raises:
        UsageError: Bad options, grids or recipes, with every problem of every run listed.
    """
    check_options(opts)
    cli_grid, problems = parse_cli_grid(opts.grids)
    data = opts.data.expanduser().resolve()
    out = opts.out.expanduser().resolve()
    recipes, runs, grid_ok = [], [], not problems
    for source in opts.recipes or [DEFAULT_RECIPE]:
        try:
            if not grid_ok:  # without a usable grid there are no points; still say which recipes are unusable
                recipe_grid(source)
                continue
            planned, points = plan_recipe(source, cli_grid, opts, data, out)
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
    if opts.devices is not None:
        devices = parse_devices(opts.devices)
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                f"--devices {','.join(devices)}: no CUDA GPU is available here; leave --devices out"
            )
    if opts.png is not None:
        from ftsgd.plots import check_plot_dir

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


# ------------------------------------------------------------------------------------------ the --out folder


def read_previous(out: Path) -> dict[str, Any] | None:
    """``sweep.json`` of an earlier sweep into ``out`` (None when there is none).

    Raises:
        UsageError: It exists but cannot be read.
    """
    path = out / SWEEP_FILE
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"{path} cannot be read ({first_line(exc)}); delete it to start the record over (the run "
            "directories are kept and reused)"
        ) from None
    if not isinstance(previous, dict) or previous.get("format") != FORMAT:
        raise UsageError(
            f"{path} is not a sweep record of this ftsgd (format {FORMAT}); delete it or use another --out"
        )
    return previous


def check_out_dir(plan: Plan, previous: dict[str, Any] | None, allow_changed_grid: bool) -> None:
    """Refuse an ``--out`` that is a run directory, a changed sweep (unless allowed), and runs of other recipes.

    Raises:
        UsageError: With every difference listed.
    """
    markers = [m for m in RUN_MARKERS if (plan.out / m).exists()]
    if markers:
        raise UsageError(
            f"--out {plan.out} is a run directory ({markers[0]}), not a sweep folder; choose another --out"
        )
    if previous is not None and not allow_changed_grid:
        changes = spec_changes(previous, spec(plan))
        if changes:
            lines = "\n".join(f"  - {c}" for c in changes)
            raise UsageError(
                f"{plan.out / SWEEP_FILE} records another sweep than this command asks for:\n{lines}\n"
                "Run the same command as before, use another --out, or pass --allow-changed-grid to change "
                "the sweep in place (finished runs still in the grid are kept; runs no longer in it are "
                "listed, never deleted)."
            )
    problems = run_dir_problems(plan)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UsageError(
            f"run directories under {plan.out} hold other recipes than this sweep would train in them:\n{lines}\n"
            "A run directory holds one recipe: use another --out (or move those runs away)."
        )


def spec(plan: Plan) -> dict[str, Any]:
    """What defines a sweep: the data and, per recipe, its grid and the rest of its resolved recipe."""
    return jsonable(
        {
            "data": str(plan.data),
            "recipes": [dataclasses.asdict(r) for r in plan.recipes],
        }
    )


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every difference between two sweeps' specs, one line each."""
    changes = []
    if old.get("data") != new["data"]:
        changes.append(f"--data: {old.get('data')} -> {new['data']}")
    before = {r["name"]: r for r in old.get("recipes", []) if isinstance(r, dict) and "name" in r}
    after = {r["name"]: r for r in new["recipes"]}
    added, removed = [n for n in after if n not in before], [n for n in before if n not in after]
    if added or removed:
        parts = [f"added {', '.join(added)}"] * bool(added) + [f"removed {', '.join(removed)}"] * bool(
            removed
        )
        changes.append(f"--recipe: {'; '.join(parts)}")
    for name in (n for n in after if n in before):
        changes += [
            f"grid of {name}: {c}"
            for c in dict_changes(before[name].get("grid", {}), after[name]["grid"], True)
        ]
        changes += [
            f"recipe {name}: {c}" for c in dict_changes(before[name].get("recipe", {}), after[name]["recipe"])
        ]
    return changes


def dict_changes(old: dict[str, Any], new: dict[str, Any], as_sets: bool = False) -> list[str]:
    """``key: old -> new`` for each differing key (list values compared as sets of values with ``as_sets``)."""
    lines = []
    for key in dict.fromkeys([*old, *new]):
        if key not in old or key not in new or _norm(old[key], as_sets) != _norm(new[key], as_sets):
            a = toml_literal(old[key]) if key in old else "(not in the grid)" if as_sets else "(unset)"
            b = toml_literal(new[key]) if key in new else "(not in the grid)" if as_sets else "(unset)"
            lines.append(f"{key}: {a} -> {b}")
    return lines


def _norm(value: Any, as_set: bool) -> Any:
    """A comparable spelling of a value; a list of grid values in sorted order when ``as_set``."""
    if as_set and isinstance(value, list):
        return sorted((canonical(v) for v in value), key=lambda c: order_key(json.loads(c)))
    return canonical(value)


def run_dir_problems(plan: Plan) -> list[str]:
    """Started run directories of the grid whose recipe differs from the one the sweep resolves for them."""
    problems = []
    for run in plan.runs:
        if run.path.exists() and not run.path.is_dir():
            problems.append(f"{run.path} is a file, not a run directory")
            continue
        rundir = RunDir(run.path)
        if rundir.status() not in ("unfinished", "finished"):
            continue  # a run that never reached a checkpoint starts over with the sweep's recipe
        try:
            own = rundir.read_recipe(plan.data, for_resume=False)
        except FtsgdError as exc:
            problems.append(f"{run.path}: {first_line(exc)}")
            continue
        changed = recipe_differences(own, run.resolved, ignore=("data.root", *SWEEP_KEYS))
        if changed:
            shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
            problems.append(f"{run.path}: {shown}")
    return problems


def outside_grid(plan: Plan) -> list[Path]:
    """Run directories under ``--out`` that are not in this sweep's grid (listed, never deleted)."""
    if not plan.out.is_dir():
        return []
    try:
        found = find_run_dirs([plan.out])
    except UsageError:
        return []
    wanted = {run.path for run in plan.runs}
    return [p for p in found if p not in wanted]


def initial_records(plan: Plan, previous: dict[str, Any] | None, retry_failed: bool) -> dict[Path, RunRecord]:
    """Each run's status from its directory, and failures recorded by an earlier sweep (kept unless retried)."""
    failed = {}
    for entry in (previous or {}).get("runs", []):
        if isinstance(entry, dict) and entry.get("status") == FAILED:
            failed[str(entry.get("path"))] = entry
    records = {}
    for run in plan.runs:
        if RunDir(run.path).status() == FINISHED:
            records[run.path] = RunRecord(FINISHED, exit_code=0, metrics=run_metrics(run.path))
        elif str(run.path) in failed and not retry_failed:
            entry = failed[str(run.path)]
            records[run.path] = RunRecord(
                FAILED, entry.get("exit_code"), entry.get("error"), entry.get("started"), entry.get("ended")
            )
        else:
            records[run.path] = RunRecord()
    return records


# ------------------------------------------------------------------------------------------ running


def make_slots(opts: SweepOptions) -> list[Slot]:
    """One slot per job: a GPU (round-robin over ``--devices``, or every visible GPU when there are several
    jobs) and a disjoint share of the CPUs, with ``OMP_NUM_THREADS`` threads (the user's value if set)."""
    devices = parse_devices(opts.devices) if opts.devices else (visible_gpus() if opts.jobs > 1 else [])
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = list(range(os.cpu_count() or 1))
    share = max(1, len(cpus) // opts.jobs)
    user_threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(user_threads) if user_threads.isdigit() and int(user_threads) > 0 else share
    slots = []
    for k in range(opts.jobs):
        if opts.jobs == 1:
            mine: tuple[int, ...] = ()
        elif len(cpus) >= opts.jobs:
            mine = tuple(cpus[k * share : (k + 1) * share])
        else:
            mine = (cpus[k % len(cpus)],)
        slots.append(Slot(k, devices[k % len(devices)] if devices else None, mine, threads))
    return slots


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES values for a child (none without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def execute(sweep: Sweep, slots: list[Slot]) -> Stop:
    """Train every pending run, ``len(slots)`` at a time, until done or stopped by SIGINT/SIGTERM."""
    queue = [run for run in sweep.plan.runs if sweep.records[run.path].status in (PENDING, INTERRUPTED)]
    active: list[Active] = []
    stop = Stop()
    with catch_signals(stop):
        try:
            while queue or active:
                forward_signals(stop, active, sweep.opts.as_json)
                while queue and not stop.count and len(active) < len(slots):
                    used = {a.slot.index for a in active}
                    slot = next(s for s in slots if s.index not in used)
                    started = start_run(sweep, queue.pop(0), slot)
                    if started is not None:
                        active.append(started)
                for done in [a for a in active if a.process.poll() is not None]:
                    active.remove(done)
                    record = run_result(done, sweep.records[done.run.path], bool(stop.count))
                    sweep.finish_run(done.run, record)
                    say(progress_line(done.run, record, len(sweep.plan.runs), done.log), sweep.opts.as_json)
                if stop.count and not active:
                    break
                time.sleep(POLL_S)
        except BaseException:  # the sweep itself failed (e.g. its disk is full): stop its runs cleanly
            for a in active:
                with contextlib.suppress(ProcessLookupError):
                    a.process.send_signal(signal.SIGTERM)
            for a in active:
                a.process.wait()
            raise
    return stop


def start_run(sweep: Sweep, run: PlannedRun, slot: Slot) -> Active | None:
    """Launch ``run`` in ``slot`` (None when it was finished meanwhile, e.g. by a scheduler)."""
    if RunDir(run.path).status() == FINISHED:
        sweep.finish_run(run, RunRecord(FINISHED, exit_code=0, metrics=run_metrics(run.path)))
        return None
    holder = held_elsewhere(run.path)
    if holder:
        say(
            f"[{run.index}/{len(sweep.plan.runs)}] skipped {run.label}: in use by {holder}",
            sweep.opts.as_json,
        )
        return None
    active = launch(run, slot, sweep.plan.out)
    sweep.records[run.path] = RunRecord(RUNNING, started=now(), pid=active.process.pid)
    sweep.write()
    where = f" on GPU {slot.device}" if slot.device is not None else ""
    if slot.cpus:
        where += f" (CPUs {','.join(map(str, slot.cpus))}, {slot.threads} thread(s))"
    say(f"[{run.index}/{len(sweep.plan.runs)}] start {run.label}{where}", sweep.opts.as_json)
    return active


def held_elsewhere(path: Path) -> str | None:
    """Who holds the run directory's lock (``PID 12 on host``) when another process trains it, else None.

    A run an external scheduler or an orphan of a killed sweep is training is left to it, not started twice.
    """
    return lock_holder(path)


def log_path(out: Path, run: PlannedRun) -> Path:
    """``OUT/logs/<recipe>/<point>.log``: the run's stdout and stderr, every attempt appended."""
    return out / LOG_DIR / run.path.parent.name / f"{run.path.name}.log"


def launch(run: PlannedRun, slot: Slot, out: Path) -> Active:
    """Start ``python -m ftsgd train ... --resume --quiet`` in its own session, pinned to ``slot``.

    Its own session: a Ctrl-C at the terminal reaches the sweep only, which passes it on once, so each run
    gets exactly one signal and saves its checkpoint. On Linux the child is also told to get SIGTERM when
    the sweep dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the sweep still stops its runs cleanly.
    """
    log = log_path(out, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "ab")  # noqa: SIM115 - closed by run_result when the child exits
    handle.write(f"=== {now()} {run.command}\n".encode())
    handle.flush()
    env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads))
    if slot.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.device
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "ftsgd", *run.args],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=functools.partial(child_setup, slot.cpus, parent_death_signal()),
        )
    except BaseException:
        handle.close()
        raise
    return Active(run, slot, process, log, handle, handle.tell())


def parent_death_signal() -> Any:
    """libc's ``prctl`` on Linux (looked up here, before the fork), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None


def child_setup(cpus: tuple[int, ...], prctl: Any) -> None:
    """In the child, between fork and exec: its CPUs, and SIGTERM when the sweep dies."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if prctl is not None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def run_result(active: Active, before: RunRecord, stopping: bool) -> RunRecord:
    """The record of a run whose process ended: finished, interrupted (by the sweep's stop) or failed."""
    active.handle.close()
    code = active.process.returncode
    record = RunRecord(started=before.started, ended=now(), exit_code=code if code >= 0 else 128 - code)
    if code == 0 and RunDir(active.run.path).status() == FINISHED:
        record.status, record.metrics = FINISHED, run_metrics(active.run.path)
    elif stopping:
        record.status = INTERRUPTED
    else:
        record.status, record.error = FAILED, failure_line(active.log, active.offset, code)
    return record


def failure_line(log: Path, offset: int, code: int) -> str:
    """The first line of the run's error message (``error: ...``), else the last line it printed."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            text = line[len("error: ") :]
            return f"{text} {lines[i + 1]}" if text.endswith(":") and i + 1 < len(lines) else text
    if lines:
        return lines[-1]
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


@contextlib.contextmanager
def catch_signals(stop: Stop) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` instead of killing the sweep (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forward_signals(stop: Stop, active: list[Active], as_json: bool) -> None:
    """Pass each signal the sweep got to its running runs: the first makes them save and exit, a second
    stops them at once."""
    if stop.count <= stop.forwarded:
        return
    for a in active:
        with contextlib.suppress(ProcessLookupError):
            a.process.send_signal(stop.signum)
    name = signal.Signals(stop.signum).name
    if stop.forwarded == 0:
        say(
            f"{name}: stopping {len(active)} running run(s) (each saves a checkpoint); no new run starts",
            as_json,
        )
    stop.forwarded = stop.count


# ------------------------------------------------------------------------------------------ printing


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def say(text: str, as_json: bool) -> None:
    """A progress line: on stdout, or on stderr when stdout carries the one JSON object."""
    if as_json:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    else:
        console.info(text)


def run_metrics(path: Path) -> dict[str, Any]:
    """A finished run's results as ``sweep.json`` records them (from its summary.json)."""
    run = read_run(path)
    return {
        "best_epoch": run.best_epoch,
        "epochs": run.epochs,
        "val_split": run.val_split,
        "accuracy": dict(run.accuracy),
        "peak_memory_bytes": run.peak_memory_bytes,
        "train_time_s": run.train_time_s,
    }


def progress_line(run: PlannedRun, record: RunRecord, total: int, log: Path) -> str:
    """``[3/12] finished sgd optim.lr=0.001,train.seed=0: val 81.25%, ood 60.00% (best epoch 4/5, 2.1 min)``."""
    head = f"[{run.index}/{total}] {record.status} {run.label}"
    if record.status == FINISHED and record.metrics:
        m = record.metrics
        accuracy = ", ".join(f"{k} {100 * v:.2f}%" for k, v in m["accuracy"].items())
        seconds = f", {human_seconds(m['train_time_s'])}" if m["train_time_s"] is not None else ""
        return f"{head}: {accuracy} (best epoch {m['best_epoch']}/{m['epochs']}{seconds})"
    if record.status == FAILED:
        return f"{head}: exit {record.exit_code}: {record.error} (log: {log})"
    return f"{head}: stopped; the same command continues it"


def announce(sweep: Sweep) -> None:
    """What the sweep is about to do, and runs under ``--out`` that are not in its grid."""
    counts = status_counts(sweep)
    plan, opts = sweep.plan, sweep.opts
    todo = counts[PENDING] + counts[INTERRUPTED]
    text = (
        f"sweep {plan.out}: {len(plan.runs)} runs of {len(plan.recipes)} recipe(s), {counts[FINISHED]} finished, "
        f"{todo} to train, {opts.jobs} at a time"
    )
    if counts[FAILED]:
        text += f"; {counts[FAILED]} failed before, not retried (--retry-failed retries them)"
    say(text, opts.as_json)
    if sweep.outside:
        shown = ", ".join(str(p.relative_to(plan.out)) for p in sweep.outside[:5])
        more = f" and {len(sweep.outside) - 5} more" if len(sweep.outside) > 5 else ""
        say(
            f"{len(sweep.outside)} run(s) under {plan.out} are not in this grid (kept, not in its selection): "
            f"{shown}{more}",
            opts.as_json,
        )


def print_sweep_report(sweep: Sweep) -> None:
    """The report's grid-point and selection tables (``ftsgd report``'s printing), then a summary line."""
    report = sweep.report
    if report is not None:
        for problem in report.problems:
            console.warn(problem)
        print_terminal(report, ["points", "selection"], sweep.plots)
    counts = status_counts(sweep)
    console.info(
        f"{len(sweep.plan.runs)} runs: "
        + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        + f"; record: {sweep.plan.out / SWEEP_FILE}"
    )


def failure_summary(sweep: Sweep) -> str:
    """The exit-1 message: each failed run with its exit code, first error line and log."""
    failed = [run for run in sweep.plan.runs if sweep.records[run.path].status == FAILED]
    lines = []
    for run in failed:
        record = sweep.records[run.path]
        lines.append(
            f"  - {run.label}: exit {record.exit_code}: {record.error} (log: {log_path(sweep.plan.out, run)})"
        )
    return (
        f"{len(failed)} of {len(sweep.plan.runs)} runs failed (the others were trained):\n"
        + "\n".join(lines)
        + "\nRerunning the same command skips them; add --retry-failed to train them again."
    )


def print_pending_commands(plan: Plan, as_json: bool) -> dict[str, Any]:
    """One ``ftsgd train ... --resume`` line per run not finished yet (for GNU parallel, a Slurm array)."""
    pending = [run for run in plan.runs if RunDir(run.path).status() != FINISHED]
    document = {"commands": [run.command for run in pending], "runs": [str(run.path) for run in pending]}
    if as_json:
        console.print_json(document)
    else:
        sys.stdout.write("".join(f"{command}\n" for command in document["commands"]))
        sys.stdout.flush()
    if not pending:
        console.warn(f"nothing to run: every run of the sweep in {plan.out} is finished")
    return document


# ------------------------------------------------------------------------------------------ sweep.json


def status_counts(sweep: Sweep) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for record in sweep.records.values():
        counts[record.status] += 1
    return counts


def collect_sweep_report(plan: Plan, records: dict[Path, RunRecord]) -> Report | None:
    """The paper's selection over the sweep's own run directories (those started so far).

    A run the sweep saw fail is marked broken, with its error as the problem, so its grid point counts it
    as a missing seed rather than a pending one.
    """
    started = [run.path for run in plan.runs if RunDir(run.path).status() != "new"]
    runs = read_runs(started)
    for run in runs:
        record = records.get(run.path)
        if record is not None and record.status == FAILED and run.status != BROKEN:
            run.status = BROKEN
            run.problems.append(f"{run.path} failed (exit {record.exit_code}): {record.error}")
    return build_report(runs) if runs else None


def sweep_document(sweep: Sweep) -> dict[str, Any]:
    """``sweep.json``: the command, the grid, each run's status and results, and the selection."""
    plan, opts = sweep.plan, sweep.opts
    runs = []
    for run in plan.runs:
        record = dataclasses.asdict(sweep.records[run.path])
        runs.append(
            {
                "recipe": run.recipe,
                "grid": run.values,
                "path": str(run.path),
                **record,
                "command": run.command,
                "log": str(log_path(plan.out, run)),
            }
        )
    return {
        "format": FORMAT,
        "command": shlex.join(["ftsgd", *opts.argv[1:]]) if opts.argv else None,
        "state": sweep.state,
        "updated": now(),
        "out": str(plan.out),
        **spec(plan),
        "jobs": opts.jobs,
        "devices": parse_devices(opts.devices) if opts.devices else None,
        "counts": status_counts(sweep),
        "runs": runs,
        "outside_grid": [str(p) for p in sweep.outside],
        "selection": sweep.report.to_dict() if sweep.report is not None else None,
        "plots": [str(p) for p in sweep.plots],
    }
