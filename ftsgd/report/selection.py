"""The paper's selection protocol over any set of runs: grid points, means over seeds, one pick per recipe.

Kumar et al. never report a single run. Within a run the best epoch is the one with the highest
ID-validation accuracy; runs that differ only in ``train.seed`` form a *grid point*; per recipe the grid
point with the highest mean over seeds of that best-epoch ID-val accuracy is selected, and its ID-val
and every other (OOD) split's accuracy are reported as mean ± std over the seeds, with the 90% interval
1.645·std/√n. This module does exactly that over :class:`ftsgd.run.collect.Run` records and returns plain
dataclasses (and :meth:`Report.to_dict`, the form ``sweep.json`` can embed), without printing.

Choices the paper leaves open, made explicit here so a result never depends on directory order:

* The grid keys are *derived*: every recipe key whose value differs between two runs of the same recipe
  (plus ``optim.lr`` whenever it differs at all). Keys that only say where or how fast a run executed
  (:data:`EXECUTION_KEYS`) are not grid keys: a seed run with 4 loader workers pools with one run with 0.
* Runs on different data folders (``data.root``) are never pooled: a selection is per recipe and dataset.
* Missing seeds: the seeds a grid point should have are every seed any run of its recipe (finished or
  not) used. A grid point with fewer finished seeds is shown as ``2/3`` and left out of the comparison,
  because its mean is noisier than the others' and a maximum over noisier means favours it; with
  ``allow_missing`` it competes.
* Ties (means equal within :data:`TIE_TOLERANCE`): the point with more finished seeds wins, then the one
  with the smaller ``optim.lr`` (the smaller step from the pretrained weights), then the smaller value of
  each other grid key in name order. The selection says ``tie`` and lists the points it tied with.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from ftsgd.errors import UsageError
from ftsgd.infer.metrics import selection_value
from ftsgd.recipe.checks import select_metric
from ftsgd.run.collect import (
    BROKEN,
    FINISHED,
    UNFINISHED,
    VAL_SPLIT,
    Run,
    find_run_dirs,
    read_runs,
    split_metrics,
    stage_count,
)

SEED_KEY = "train.seed"
"""The key whose runs are averaged over rather than selected between."""
LR_KEY = "optim.lr"
UNIT_KEYS = frozenset({"name", "data.root"})
"""A selection is made per recipe name and data folder; these are never grid keys."""
EXECUTION_KEYS = frozenset(
    {
        "description",
        "base",
        "data.num_workers",
        "data.pin_memory",
        "train.device",
        "train.checkpoint_every",
        "train.compile",
        "train.grad_checkpointing",
        "train.channels_last",
        "sweep.grid",
    }
)
"""Keys that change where or how fast a run executes (or, ``sweep.grid``, which other runs ``ftsgd sweep``
makes), not what it trains: they never split a grid point."""
Z90 = 1.645
"""The paper's 90% interval half-width is ``Z90 * std / sqrt(n)``."""
TIE_TOLERANCE = 1e-9
"""Mean accuracies closer than this are a tie (accuracies are counts over a val set of far fewer images)."""
MISSING = "<missing>"
DEFAULT_SELECT_BY = "val.accuracy"
"""The paper's selection: best epoch and grid point by ID-validation accuracy."""
METRICS = ("accuracy", "top5", "macro_f1", "balanced_accuracy")
"""What ``ftsgd report --metric`` may show in the split columns (fractions, shown as percentages)."""


@dataclass(frozen=True)
class Stat:
    """Mean and spread of one accuracy over the seeds of a grid point."""

    mean: float
    std: float | None
    """Sample standard deviation (n - 1); None for a single seed."""
    n: int

    @property
    def ci90(self) -> float | None:
        """Half-width of the paper's 90% interval, 1.645·std/√n."""
        return None if self.std is None else Z90 * self.std / math.sqrt(self.n)

    def to_dict(self) -> dict[str, Any]:
        """``{"mean", "std", "ci90", "n"}`` (std and ci90 null for one seed)."""
        return {"mean": self.mean, "std": self.std, "ci90": self.ci90, "n": self.n}


def stat(values: Sequence[float]) -> Stat | None:
    """:class:`Stat` of ``values`` (None when empty)."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(mean=statistics.fmean(values), std=std, n=len(values))


@dataclass
class GridPoint:
    """The runs of one recipe that differ only in their seed."""

    recipe: str
    data: str
    values: dict[str, Any]
    """The grid keys' values (the seed excluded)."""
    runs: list[Run]
    """Finished runs, one per seed, in seed order."""
    unfinished: list[Run]
    broken: list[Run]
    """Runs of this point whose summary.json could not be read (their problems say why)."""
    expected_seeds: list[Any]
    """Every seed a run of this recipe and data folder used: what a complete point has."""
    val: Stat | None
    """Best-epoch ID-val accuracy over the finished seeds."""
    splits: dict[str, Stat]
    """Every other split's accuracy at each run's best epoch, over the finished seeds."""
    peak_memory_bytes: int | None
    """The largest peak over the seeds (what a run of this point needs)."""
    train_time_s: float | None
    """Mean training time of one run."""
    selected: bool = False
    score: Stat | None = None
    """The ``--select-by`` value over the finished seeds (a loss negated); what :func:`select` compares."""

    @property
    def seeds(self) -> list[Any]:
        """The finished runs' seeds."""
        return [r.seed for r in self.runs]

    @property
    def complete(self) -> bool:
        """Whether every expected seed has finished."""
        return len(self.runs) >= len(self.expected_seeds)

    @property
    def label(self) -> str:
        """``optim.lr=0.001, train.epochs=10`` (``-`` when the recipe has a single point)."""
        return ", ".join(f"{k}={display_value(v)}" for k, v in self.values.items()) or "-"


@dataclass
class Selection:
    """The grid point chosen for one recipe (and data folder), and why."""

    recipe: str
    data: str
    point: GridPoint | None
    """None when no grid point could be compared (see ``reason``)."""
    compared: list[GridPoint]
    excluded: list[GridPoint]
    """Points with missing seeds left out of the comparison (empty with ``allow_missing``)."""
    tied: list[GridPoint]
    """Every point sharing the top mean, the chosen one first; empty without a tie."""
    reason: str

    @property
    def tie(self) -> bool:
        """Whether another compared point had the same mean (within :data:`TIE_TOLERANCE`)."""
        return len(self.tied) > 1


@dataclass
class Report:
    """Everything a report shows: the runs, their grid points and one selection per recipe."""

    runs: list[Run]
    grid_keys: list[str]
    """Derived grid keys, ``optim.lr`` first and ``train.seed`` last."""
    ignored_keys: list[str]
    """Execution-only keys whose values differ between runs (not grid keys)."""
    splits: list[str]
    """Every split with results, the ID-val split first."""
    points: list[GridPoint]
    selections: list[Selection]
    allow_missing: bool
    problems: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    """The metric the split columns show (``--metric``)."""
    select_by: str = DEFAULT_SELECT_BY
    """What picks each run's best epoch and each recipe's grid point (``--select-by``)."""

    @property
    def point_keys(self) -> list[str]:
        """The grid keys without the seed."""
        return [k for k in self.grid_keys if k != SEED_KEY]

    @property
    def ood_splits(self) -> list[str]:
        """Every split but the ID-val one."""
        return self.splits[1:]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``--json`` prints it; a sweep can store it in ``sweep.json``)."""
        return report_to_dict(self)


# --------------------------------------------------------------------------- building


def collect_report(
    paths: Sequence[Path],
    *,
    allow_missing: bool = False,
    metric: str = "accuracy",
    select_by: str = DEFAULT_SELECT_BY,
) -> Report:
    """Find, read and select: the whole protocol over run directories and folders holding them.

    Raises:
        UsageError: A path does not exist or holds no run directory, or an unknown ``metric``/``select_by``.
    """
    check_report_metrics(metric, select_by)
    runs = read_runs(find_run_dirs(paths))
    return build_report(runs, allow_missing=allow_missing, metric=metric, select_by=select_by)


def check_report_metrics(metric: str, select_by: str) -> None:
    """``--metric`` is one of :data:`METRICS`; ``--select-by`` is SPLIT.METRIC as ``train.select_by`` is."""
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    try:
        select_metric(select_by)
    except ValueError as exc:
        raise UsageError(f"--select-by: {exc}") from None


def build_report(
    runs: list[Run],
    *,
    allow_missing: bool = False,
    metric: str = "accuracy",
    select_by: str = DEFAULT_SELECT_BY,
) -> Report:
    """Group ``runs`` into grid points and select one point per recipe and data folder.

    Args:
        runs: The runs as read.
        allow_missing: Compare grid points with missing seeds too.
        metric: What the split columns show (:data:`METRICS`).
        select_by: ``SPLIT.METRIC``: picks each run's best epoch (from its metrics.jsonl, unless it is the
            paper's ``val.accuracy``, which the run itself picked by) and each recipe's grid point.
    """
    runs = [scored(r, metric, select_by) for r in runs]
    if not any(r.score is not None for r in runs) and any(r.results for r in runs):
        known = sorted(
            {f"{name}.{m}" for r in runs for name, ms in r.results.items() for m in ms if m != "n"}
        )
        raise UsageError(f"--select-by {select_by}: no run has it; runs have {', '.join(known)}")
    grid_keys, ignored = derive_grid_keys(runs)
    point_keys = [k for k in grid_keys if k != SEED_KEY]
    problems = [p for r in runs for p in r.problems]
    points = build_points(runs, point_keys, problems)
    selections = [
        select(unit, allow_missing=allow_missing, select_by=select_by) for unit in _by_unit(points, _unit_key)
    ]
    val = next((r.val_split for r in runs if r.accuracy), VAL_SPLIT)
    others = {name for r in runs for name in r.accuracy if name != val}
    ood = sorted(others - {"worst", "mean"}) + [a for a in ("worst", "mean") if a in others]
    return Report(
        runs=runs,
        grid_keys=grid_keys,
        ignored_keys=ignored,
        splits=[val, *ood],
        points=points,
        selections=selections,
        allow_missing=allow_missing,
        problems=problems,
        metric=metric,
        select_by=select_by,
    )


def scored(run: Run, metric: str, select_by: str) -> Run:
    """``run`` as the report shows and selects it: its split columns in ``metric``, its score by ``select_by``.

    With another ``select_by`` than the paper's, the best epoch is picked anew from metrics.jsonl by it, as
    ``train.select_by`` would have (the last stage's epochs compete, ties keep the earlier epoch).
    """
    split, name = select_metric(select_by)
    results, best = run.results, run.best_epoch
    if select_by != DEFAULT_SELECT_BY and run.history and run.status != BROKEN:
        last = max(stage_count(run.values), 1)
        candidates = [
            (_value(split_metrics(r["splits"], run.val_split), split, name), -i)
            for i, r in enumerate(run.history)
            if r.get("stage", 1) == last
        ]
        ranked = [c for c in candidates if c[0] is not None]
        if ranked:
            _, neg = max(ranked)
            best, results = -neg + 1, split_metrics(run.history[-neg]["splits"], run.val_split)
    accuracy = {s: m[metric] for s, m in results.items() if metric in m}
    return replace(
        run, results=results, best_epoch=best, accuracy=accuracy, score=_value(results, split, name)
    )


def _value(results: dict[str, dict[str, float]], split: str, metric: str) -> float | None:
    """A split's metric as a score (higher is better: a loss is negated), None when the run lacks it."""
    try:
        value = selection_value(results, split, metric)
    except KeyError:
        return None
    return -value if metric == "loss" else value


def _placed(runs: list[Run]) -> list[Run]:
    """Runs whose recipe is known, whatever their status: each has a place in the grid."""
    return [r for r in runs if r.values]


def _unit_key(item: Run | GridPoint) -> tuple[str, str]:
    """Selections are made per recipe and data folder."""
    return (item.recipe, item.data)


def _by_unit(items: list[Any], key: Any) -> list[list[Any]]:
    """``items`` grouped by ``key(item)``, groups in sorted key order, items in their order."""
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [groups[k] for k in sorted(groups)]


def canonical(value: Any) -> str:
    """A hashable, order-independent spelling of a recipe value (lists and tables included)."""
    return json.dumps(value, sort_keys=True)


def derive_grid_keys(runs: list[Run]) -> tuple[list[str], list[str]]:
    """The recipe keys that differ between runs of one recipe (``optim.lr``: between any runs).

    Returns:
        ``(grid_keys, ignored_keys)``: grid keys with ``optim.lr`` first and ``train.seed`` last, and
        the execution-only keys that differ (reported, never grid keys).
    """
    placed = _placed(runs)
    varying: set[str] = set()
    for unit in _by_unit(placed, _unit_key):
        varying |= _differing(unit)
    if LR_KEY in _differing(placed):
        varying.add(LR_KEY)
    # [slurm] says where a run was scheduled, not what it trained: never a grid key, never reported
    varying = {k for k in varying if not k.startswith("slurm.")}
    keys = sorted(varying - EXECUTION_KEYS - UNIT_KEYS, key=lambda k: (k != LR_KEY, k == SEED_KEY, k))
    return keys, sorted(varying & EXECUTION_KEYS)


def _differing(runs: list[Run]) -> set[str]:
    runs = [r for r in runs if r.values]  # a run whose recipe.toml is unreadable says nothing about the grid
    keys = {k for r in runs for k in r.values}
    return {k for k in keys if len({canonical(r.values.get(k, MISSING)) for r in runs}) > 1}


def build_points(runs: list[Run], point_keys: list[str], problems: list[str]) -> list[GridPoint]:
    """One :class:`GridPoint` per recipe, data folder and value of the non-seed grid keys.

    The seeds a point should have are those of every run of its recipe and data folder, broken and
    unfinished ones included: a seed whose summary.json is corrupt is still a missing seed.
    """
    placed = _placed(runs)
    expected = {}
    for unit in _by_unit(placed, _unit_key):
        expected[_unit_key(unit[0])] = sorted(
            {canonical(r.seed): r.seed for r in unit}.values(), key=order_key
        )
    return [
        _point(group, point_keys, expected[_unit_key(group[0])], problems)
        for group in _by_unit(placed, partial(_point_key, keys=point_keys))
    ]


def _point_key(run: Run, keys: list[str]) -> tuple[Any, ...]:
    return (run.recipe, run.data, tuple(canonical(run.values.get(k, MISSING)) for k in keys))


def _one_per_seed(runs: list[Run], problems: list[str]) -> list[Run]:
    """Finished runs in seed order, a repeated seed (a copied or relaunched run) kept once.

    The first by path is kept and each repeat is reported in ``problems``: averaging a seed in twice
    would shrink the std and tilt the mean.
    """
    by_seed: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.path):
        seen = by_seed.setdefault(canonical(run.seed), run)
        if seen is not run:
            problems.append(
                f"{run.path} repeats seed {run.seed} of {seen.path} (same grid point); it is left out of the mean"
            )
    return sorted(by_seed.values(), key=lambda r: order_key(r.seed))


def _point(group: list[Run], keys: list[str], expected: list[Any], problems: list[str]) -> GridPoint:
    done = _one_per_seed([r for r in group if r.status == FINISHED], problems)
    names = sorted({n for r in done for n in r.accuracy if n != r.val_split})
    splits = {n: s for n in names if (s := stat([r.accuracy[n] for r in done if n in r.accuracy]))}
    peaks = [r.peak_memory_bytes for r in done if r.peak_memory_bytes is not None]
    times = [r.train_time_s for r in done if r.train_time_s is not None]
    return GridPoint(
        recipe=group[0].recipe,
        data=group[0].data,
        values={k: group[0].values.get(k) for k in keys},
        runs=done,
        unfinished=[r for r in group if r.status == UNFINISHED],
        broken=[r for r in group if r.status == BROKEN],
        expected_seeds=expected,
        val=stat([r.val_accuracy for r in done if r.val_accuracy is not None]),
        splits=splits,
        peak_memory_bytes=max(peaks) if peaks else None,
        train_time_s=statistics.fmean(times) if times else None,
        score=stat([r.score for r in done if r.score is not None]),
    )


# --------------------------------------------------------------------------- selecting


def order_key(value: Any) -> tuple[int, Any]:
    """Sort key for grid values: numbers numerically, then anything else by its spelling."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value))
    return (1, canonical(value))


def tie_break_key(point: GridPoint) -> tuple[Any, ...]:
    """More finished seeds first, then the smaller ``optim.lr``, then smaller values key by key."""
    keys = sorted(point.values, key=lambda k: (k != LR_KEY, k))
    return (-len(point.runs), *(order_key(point.values[k]) for k in keys))


def select(
    points: list[GridPoint], *, allow_missing: bool = False, select_by: str = DEFAULT_SELECT_BY
) -> Selection:
    """Pick the grid point of one recipe and data folder with the highest mean best-epoch score.

    Args:
        points: The grid points of one recipe and data folder.
        allow_missing: Compare points with fewer finished seeds than expected too.
        select_by: What the score is, for the reason (:attr:`GridPoint.score`; ID-val accuracy by default).
    """
    first = points[0]
    scored = [p for p in points if p.score is not None]
    compared = [p for p in scored if p.complete or allow_missing]
    excluded = [p for p in scored if p not in compared]
    if not compared:
        n = len(first.expected_seeds)
        reason = (
            f"no grid point has all {n} seeds finished; finish them or pass --allow-missing"
            if scored
            else "no finished run yet"
        )
        return Selection(first.recipe, first.data, None, [], excluded, [], reason)
    top = max(p.score.mean for p in compared if p.score is not None)
    tied = sorted(
        (p for p in compared if p.score is not None and top - p.score.mean <= TIE_TOLERANCE),
        key=tie_break_key,
    )
    chosen = tied[0]
    chosen.selected = True
    what = "ID-val accuracy" if select_by == DEFAULT_SELECT_BY else select_by
    reason = f"highest mean {what} of {len(compared)} grid point(s)"
    if len(tied) > 1:
        others = "; ".join(p.label for p in tied[1:])
        reason = (
            f"tie at {top:.4f} with {others}: kept the one with the most finished seeds, then the "
            f"smallest {LR_KEY}, then the smallest value of each other grid key"
        )
    if excluded:
        reason += f"; {len(excluded)} point(s) with missing seeds left out (--allow-missing compares them)"
    return Selection(
        first.recipe, first.data, chosen, compared, excluded, tied if len(tied) > 1 else [], reason
    )


# --------------------------------------------------------------------------- plain data


def display_value(value: Any) -> str:
    """A grid value as people write it: ``0.001``, ``3e-05``, ``flip``, ``[0.9, 0.999]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def run_to_dict(run: Run, grid_keys: list[str]) -> dict[str, Any]:
    """One run as plain data: where it is, how far it got, its grid values and best-epoch results."""
    return {
        "path": str(run.path),
        "status": run.status,
        "recipe": run.recipe,
        "data": run.data,
        "grid": {k: run.values.get(k) for k in grid_keys},
        "epochs": run.epochs,
        "epochs_done": run.epochs_done,
        "best_epoch": run.best_epoch,
        "val_split": run.val_split,
        "accuracy": dict(run.accuracy),
        "results": {name: dict(m) for name, m in run.results.items()},
        "peak_memory_bytes": run.peak_memory_bytes,
        "train_time_s": run.train_time_s,
        "problems": list(run.problems),
    }


def point_to_dict(point: GridPoint) -> dict[str, Any]:
    """One grid point as plain data: its seeds (finished and expected), means and run paths."""
    return {
        "recipe": point.recipe,
        "data": point.data,
        "grid": dict(point.values),
        "seeds": point.seeds,
        "expected_seeds": list(point.expected_seeds),
        "complete": point.complete,
        "unfinished": [str(r.path) for r in point.unfinished],
        "broken": [str(r.path) for r in point.broken],
        "val": point.val.to_dict() if point.val else None,
        "score": point.score.to_dict() if point.score else None,
        "splits": {n: s.to_dict() for n, s in point.splits.items()},
        "peak_memory_bytes": point.peak_memory_bytes,
        "train_time_s": point.train_time_s,
        "runs": [str(r.path) for r in point.runs],
        "selected": point.selected,
    }


def selection_to_dict(selection: Selection) -> dict[str, Any]:
    """One selection as plain data: the chosen point (or null), ties, left-out points and the reason."""
    return {
        "recipe": selection.recipe,
        "data": selection.data,
        "selected": point_to_dict(selection.point) if selection.point else None,
        "peak_memory_bytes": selection.point.peak_memory_bytes if selection.point else None,
        "compared": len(selection.compared),
        "excluded": [dict(p.values) for p in selection.excluded],
        "tie": selection.tie,
        "tied_with": [dict(p.values) for p in selection.tied[1:]],
        "reason": selection.reason,
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    """The whole report as plain JSON-ready data."""
    return {
        "protocol": {
            "best_epoch": f"highest {report.select_by} within a run",
            "selected_by": f"highest mean over seeds of the best-epoch {report.select_by}, per recipe and data",
            "select_by": report.select_by,
            "metric": report.metric,
            "seed_key": SEED_KEY,
            "std": "sample standard deviation (n - 1)",
            "ci90": f"{Z90} * std / sqrt(n)",
            "tie_break": ["more finished seeds", f"smaller {LR_KEY}", "smaller value of each other grid key"],
            "allow_missing": report.allow_missing,
        },
        "grid_keys": list(report.grid_keys),
        "ignored_keys": list(report.ignored_keys),
        "splits": list(report.splits),
        "selections": [selection_to_dict(s) for s in report.selections],
        "grid_points": [point_to_dict(p) for p in report.points],
        "runs": [run_to_dict(r, report.grid_keys) for r in report.runs],
        "unfinished": [str(r.path) for r in report.runs if r.status == UNFINISHED],
        "problems": list(report.problems),
    }
