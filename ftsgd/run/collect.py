"""Find run directories and read what each one holds: the recipe it ran, how far it got, its results.

A run directory is recognised by its files, not by how it was launched (``ftsgd train``, a shell loop,
a Slurm array, a future ``ftsgd sweep``), so any set of runs can be compared. Reading never raises for
one bad run: a corrupt ``summary.json`` or ``recipe.toml`` becomes a :class:`Run` with status
``broken`` and a problem line, because a report that dies on the 37th of 72 runs helps nobody. Only a
path that holds no run at all is a usage error.

Reading needs no torch (``ftsgd report`` never loads it); the file names come from
:mod:`ftsgd.run.files`, as they do for :mod:`ftsgd.run.rundir`, which writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsgd.errors import UsageError
from ftsgd.infer.metrics import aggregate_splits
from ftsgd.recipe.dump import flatten_recipe
from ftsgd.recipe.schema import STAGE_KEY, LoraConfig
from ftsgd.run.files import METRICS, RECIPE_FILE, RUN_MARKERS, SUMMARY

VAL_SPLIT = "val"
"""The ID-validation split's name in metrics.jsonl and summary.json (``ftsgd train`` always uses it)."""

FINISHED, UNFINISHED, BROKEN = "finished", "unfinished", "broken"


@dataclass
class Run:
    """One run directory as read from disk."""

    path: Path
    """Absolute path of the run directory."""
    status: str
    """``finished`` (summary.json), ``unfinished`` (no summary.json yet) or ``broken`` (unreadable files)."""
    recipe: str
    """The recipe's name (``name`` in recipe.toml, ``recipe`` in summary.json); ``?`` when unknown."""
    values: dict[str, Any] = field(default_factory=dict)
    """The resolved recipe, flattened to dotted keys (``optim.lr``); empty without a readable recipe.toml."""
    epochs: int | None = None
    """Epochs the recipe asks for."""
    epochs_done: int = 0
    """Epochs recorded in metrics.jsonl."""
    best_epoch: int | None = None
    """1-based epoch of the best ID-val accuracy (so far, for an unfinished run)."""
    val_split: str = VAL_SPLIT
    accuracy: dict[str, float] = field(default_factory=dict)
    """Every split's accuracy at the best epoch, the ID-val split first, the aggregates (worst, mean) last.
    A report shown by another metric (``ftsgd report --metric``) holds that metric here."""
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    """Every split's numeric metrics (accuracy, macro_f1, balanced_accuracy, loss, ...) at the best epoch,
    in the order of :attr:`accuracy`."""
    score: float | None = None
    """What the report selects by (``--select-by``; higher is better, a loss negated); default ID-val accuracy."""
    peak_memory_bytes: int | None = None
    train_time_s: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """The epoch records of metrics.jsonl, for learning curves."""
    problems: list[str] = field(default_factory=list)
    """Why the run is broken or only partly readable, one line each."""

    @property
    def seed(self) -> Any:
        """The run's ``train.seed`` (None without a recipe)."""
        return self.values.get("train.seed")

    @property
    def data(self) -> str:
        """The dataset folder the run trained on (``data.root``)."""
        return str(self.values.get("data.root", ""))

    @property
    def val_accuracy(self) -> float | None:
        """ID-validation accuracy at the best epoch."""
        return self.accuracy.get(self.val_split)


# --------------------------------------------------------------------------- finding


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Every run directory named by ``paths``, or found below them, in sorted order.

    A path is either a run directory itself, one of a run's files (``summary.json``), or any folder
    with run directories somewhere below it (a sweep's ``--out``); the search does not descend into a
    run directory.

    Raises:
        UsageError: Listing every path that does not exist or holds no run directory.
    """
    found: dict[Path, None] = {}
    problems = []
    for path in paths:
        runs = _runs_under(Path(path).expanduser())
        if isinstance(runs, str):
            problems.append(runs)
        else:
            found.update(dict.fromkeys(runs))
    if problems:
        raise UsageError("nothing to report:\n" + "\n".join(f"  - {p}" for p in problems))
    return sorted(found)


def _runs_under(path: Path) -> list[Path] | str:
    """The run directories at or below ``path``, or a problem line when there are none."""
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        if path.name in RUN_MARKERS:
            return [path.parent.resolve()]
        return f"{path} is a file, not a run directory or a folder of runs"
    runs = []
    seen: set[str] = set()  # links are followed (a folder of links to runs), each real folder read once
    for folder, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if any(name in files for name in RUN_MARKERS):
            runs.append(Path(folder).resolve())
            dirs.clear()  # a run directory holds no runs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    if not runs:
        return f"{path} holds no run directory (no {', '.join(RUN_MARKERS)} in it or below it)"
    return runs


# --------------------------------------------------------------------------- reading


def read_runs(paths: Iterable[Path]) -> list[Run]:
    """:func:`read_run` for each directory."""
    return [read_run(p) for p in paths]


def read_run(path: Path) -> Run:
    """Read one run directory; unreadable files become problems on the returned run, never exceptions."""
    path = Path(path).resolve()
    values, recipe_problem = _read_recipe(path / RECIPE_FILE)
    history, history_problem = _read_history(path / METRICS)
    summary, summary_problem = _read_summary(path / SUMMARY)
    run = Run(
        path=path,
        status=UNFINISHED,
        recipe=str(values.get("name") or "?"),
        values=values,
        epochs=recipe_epochs(values),
        epochs_done=len(history),
        history=history,
        problems=[p for p in (recipe_problem, history_problem, summary_problem) if p],
    )
    if summary is not None:
        _apply_summary(run, summary)
    else:
        _apply_history(run)
    if summary_problem or recipe_problem:
        run.status = BROKEN
    elif not values and run.status == FINISHED:
        run.status = BROKEN
        run.problems.append(f"{path / RECIPE_FILE} is missing: the run's grid values are unknown")
    return run


def _read_recipe(path: Path) -> tuple[dict[str, Any], str | None]:
    """The resolved recipe flattened to dotted keys, or ``({}, problem)``."""
    if not path.exists():
        return {}, None
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        json.dumps(raw)  # a TOML date or time is no recipe value
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, TypeError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return {}, f"{path} cannot be read ({reason}); the run is left out of the selection"
    flat = flatten_recipe(raw)
    if "lora" not in raw:  # written before [lora] existed: no adapters, the defaults' values
        flat.update({f"lora.{k}": v for k, v in dataclasses.asdict(LoraConfig()).items()})
    return flat, None


def stage_count(values: dict[str, Any]) -> int:
    """How many ``[[stage]]`` tables a flattened recipe has (0: none)."""
    numbers = [k.split(".")[1] for k in values if k.startswith(f"{STAGE_KEY}.")]
    return max((int(n) for n in numbers if n.isdigit()), default=0)


def recipe_epochs(values: dict[str, Any]) -> int | None:
    """Epochs a flattened recipe trains: the sum of its stages' epochs, else ``train.epochs``."""
    stages = stage_count(values)
    if stages:
        epochs = [_as_int(values.get(f"{STAGE_KEY}.{n}.train.epochs")) for n in range(1, stages + 1)]
        return None if None in epochs else sum(e for e in epochs if e is not None)
    return _as_int(values.get("train.epochs"))


def _read_history(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The epoch records of metrics.jsonl; a bad line ends the history and becomes the problem."""
    if not path.exists():
        return [], None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], f"{path} cannot be read ({exc})"
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("splits"), dict):
            return history, f"{path} line {number} is not an epoch record; curves stop before it"
        history.append(record)
    return history, None


def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """summary.json as a dict with the fields a report needs, or ``(None, problem)``."""
    if not path.exists():
        return None, None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return None, f"{path} cannot be read ({type(exc).__name__}: {exc})"
    if not isinstance(summary, dict):
        return None, f"{path} does not hold a JSON object"
    best = summary.get("best")
    val = summary.get("val_split", VAL_SPLIT)
    if not isinstance(best, dict) or _accuracy(best.get(val)) is None:
        return None, f"{path} has no best-epoch accuracy for its ID-val split {val!r}"
    return summary, None


def _accuracy(metrics: Any) -> float | None:
    """A split's finite accuracy from a ``{"accuracy": ...}`` record, else None."""
    value = metrics.get("accuracy") if isinstance(metrics, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


AGGREGATES = ("worst", "mean")
"""Aggregates over the evaluation splits other than val, recorded like splits (computed for older runs)."""


def split_metrics(splits: dict[str, Any], val: str) -> dict[str, dict[str, float]]:
    """Each split's finite numeric metrics: the ID-val split first, the others sorted, then worst and mean.

    Runs recorded before ftsgd wrote the aggregates get them computed here, from the same numbers.
    """
    out: dict[str, dict[str, float]] = {}
    names = [val, *sorted(n for n in splits if n != val and n not in AGGREGATES)]
    for name in names:
        metrics = splits.get(name)
        if _accuracy(metrics) is not None:
            out[name] = {k: v for k, val_ in metrics.items() if (v := _as_float(val_)) is not None}
    if not any(name in splits for name in AGGREGATES):  # a run recorded before ftsgd wrote them
        splits = {**splits, **aggregate_splits(out, val)}
    for name in AGGREGATES:
        metrics = splits.get(name)
        if isinstance(metrics, dict) and metrics:
            out[name] = {k: v for k, val_ in metrics.items() if (v := _as_float(val_)) is not None}
    return out


def _split_accuracies(splits: dict[str, Any], val: str) -> dict[str, float]:
    """Each split's accuracy, in :func:`split_metrics`' order."""
    return {name: m["accuracy"] for name, m in split_metrics(splits, val).items() if "accuracy" in m}


def _apply_summary(run: Run, summary: dict[str, Any]) -> None:
    """Fill a finished run's results from its summary.json (the numbers the run itself reported)."""
    run.status = FINISHED
    run.recipe = str(summary.get("recipe") or run.recipe)
    run.val_split = str(summary.get("val_split", VAL_SPLIT))
    run.best_epoch = _as_int(summary.get("best_epoch"))
    run.epochs = _as_int(summary.get("epochs")) or run.epochs
    run.results = split_metrics(summary["best"], run.val_split)
    run.accuracy = _split_accuracies(summary["best"], run.val_split)
    run.peak_memory_bytes = _as_int(summary.get("peak_memory_bytes"))
    run.train_time_s = _as_float(summary.get("train_time_s"))
    if not run.values.get("data.root") and isinstance(summary.get("data"), str):
        run.values.setdefault("data.root", summary["data"])


def _apply_history(run: Run) -> None:
    """An unfinished run's best epoch so far, its time and peak memory, from metrics.jsonl."""
    last = max(stage_count(run.values), 1)  # the best epoch is one of the last stage's, as train picks it
    scores = [
        _accuracy(r["splits"].get(run.val_split)) if r.get("stage", 1) == last else None for r in run.history
    ]
    ranked = [(s, -i) for i, s in enumerate(scores) if s is not None]
    if ranked:
        _, neg_index = max(ranked)  # the first epoch reaching the best accuracy, as train does
        run.best_epoch = -neg_index + 1
        run.results = split_metrics(run.history[-neg_index]["splits"], run.val_split)
        run.accuracy = _split_accuracies(run.history[-neg_index]["splits"], run.val_split)
    peaks = [p for r in run.history if (p := _as_int(r.get("peak_memory_bytes"))) is not None]
    run.peak_memory_bytes = max(peaks) if peaks else None
    times = [t for r in run.history if (t := _as_float(r.get("epoch_time_s"))) is not None]
    run.train_time_s = sum(times) if run.history else None
