"""The sweep's record: its ``--out`` folder checked against what it was asked before, each run's status, and
``sweep.json`` written from them (atomically, at every run's start and end) with the selection so far."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftsgd.errors import FtsgdError, UsageError, first_line
from ftsgd.recipe.dump import recipe_differences
from ftsgd.recipe.grid import SWEEP_KEYS
from ftsgd.recipe.values import toml_literal
from ftsgd.report.selection import Report, build_report, canonical, order_key
from ftsgd.run.collect import BROKEN, find_run_dirs, read_run, read_runs
from ftsgd.run.files import RUN_MARKERS
from ftsgd.run.rundir import RunDir
from ftsgd.sweep.plan import Plan, PlannedRun, SweepOptions, parse_devices
from ftsgd.utils.fileio import atomic_write_text, jsonable

SWEEP_FILE = "sweep.json"
LOG_DIR = "logs"
"""``OUT/logs/<recipe>/<point>.log``: each run's output."""
FORMAT = 1
"""``sweep.json``'s format version; a record of another version is refused, never misread."""

PENDING, RUNNING, FINISHED, FAILED, INTERRUPTED = "pending", "running", "finished", "failed", "interrupted"
QUEUED = "queued"
"""A run submitted to Slurm (``--slurm``) that has not started yet (or was requeued)."""
STATUSES = (PENDING, QUEUED, RUNNING, FINISHED, FAILED, INTERRUPTED)
"""A run's status in ``sweep.json`` (and, but for ``pending``, the sweep's ``state``)."""
INCOMPLETE = "incomplete"
"""A sweep's state when runs are left that another process was training (they were not started twice)."""


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
    slurm_task: str | None = None
    """``--slurm``: the point's last Slurm task (``ARRAYJOB_TASK``, what ``scancel`` takes)."""


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
    except RecursionError:
        raise UsageError(
            f"{path} nests too deeply to be a sweep record; delete it or use another --out"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"{path} cannot be read ({first_line(exc)}); delete it to start the record over (the run "
            "directories are kept and reused)"
        ) from None
    if not isinstance(previous, dict) or previous.get("format") != FORMAT or not _record_shape_ok(previous):
        raise UsageError(
            f"{path} is not a sweep record of this ftsgd (format {FORMAT}); delete it or use another --out"
        )
    return previous


def _record_shape_ok(previous: dict[str, Any]) -> bool:
    """The parts of an earlier ``sweep.json`` that a sweep reads have the types it wrote (a hand-edit may not)."""
    recipes, runs = previous.get("recipes", []), previous.get("runs", [])
    if not isinstance(recipes, list) or not isinstance(runs, list):
        return False
    tables_ok = all(
        isinstance(r, dict) and isinstance(r.get("grid", {}), dict) and isinstance(r.get("recipe", {}), dict)
        for r in recipes
    )
    return tables_ok and all(isinstance(r, dict) for r in runs)


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


def open_sweep(plan: Plan, opts: SweepOptions) -> Sweep:
    """Check ``--out`` against what an earlier sweep recorded there, take each run's status, write ``sweep.json``.

    The caller holds the folder's lock.

    Raises:
        UsageError: ``--out`` is a run directory, records another sweep (unless allowed) or holds runs of
            other recipes; see :func:`check_out_dir`.
    """
    previous = read_previous(plan.out)
    check_out_dir(plan, previous, opts.allow_changed_grid)
    sweep = Sweep(plan, opts, initial_records(plan, previous, opts.retry_failed), outside_grid(plan))
    sweep.report = collect_sweep_report(plan, sweep.records)
    sweep.write()
    return sweep


def status_counts(sweep: Sweep) -> dict[str, int]:
    """How many runs have each status (every status listed, zeros too)."""
    counts = dict.fromkeys(STATUSES, 0)
    for record in sweep.records.values():
        counts[record.status] += 1
    return counts


def collect_sweep_report(
    plan: Plan, records: dict[Path, RunRecord], *, metric: str = "accuracy", select_by: str = "val.accuracy"
) -> Report | None:
    """The paper's selection (or ``--select-by``'s) over the sweep's own run directories (those started so far).

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
    return build_report(runs, metric=metric, select_by=select_by) if runs else None


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


def log_path(out: Path, run: PlannedRun) -> Path:
    """``OUT/logs/<recipe>/<point>.log``: the run's stdout and stderr, every attempt appended."""
    return out / LOG_DIR / run.path.parent.name / f"{run.path.name}.log"


def now() -> str:
    """The time as ``sweep.json`` records it: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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
