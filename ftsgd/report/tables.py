"""``ftsgd report``: the comparison tables of a set of runs, as a terminal table, JSON, CSV or Markdown.

The numbers come from :mod:`ftsgd.selection` (which runs, which grid points, which selection); this
module only lays them out. Three tables: *selection* (one row per recipe: the paper's table), *points*
(every grid point with its mean over seeds, what the selection chose between) and *runs* (every run
directory, unfinished and broken ones included). Every table is built once as typed cells, then
rendered: percentages with two decimals and ``mean ± std`` for people (terminal, Markdown), raw
fractions and separate ``_mean``/``_std``/``_ci90`` columns for programs (CSV).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsgd.errors import UsageError
from ftsgd.report.selection import (
    GridPoint,
    Report,
    Selection,
    Stat,
    check_report_metrics,
    collect_report,
    display_value,
)
from ftsgd.run.collect import UNFINISHED, Run
from ftsgd.utils.console import info, print_json, print_table, warn

TABLES = ("selection", "points", "runs")
FORMATS = ("table", "json", "csv", "markdown")


@dataclass(frozen=True)
class Column:
    """One column: a machine name (CSV header), a human header, and the kind of its cells."""

    key: str
    header: str
    kind: str = "text"
    """``text``, ``value`` (a grid value), ``acc`` (a fraction), ``stat`` (a :class:`Stat`), ``seeds``
    (finished, expected, unfinished, broken), ``bytes`` or ``seconds``."""


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]
    rows: list[list[Any]]


# --------------------------------------------------------------------------- entry point


def output_format(*, as_json: bool, as_csv: bool, as_markdown: bool) -> str:
    """``table``, ``json``, ``csv`` or ``markdown``; more than one flag is a usage error."""
    chosen = [name for name, on in (("json", as_json), ("csv", as_csv), ("markdown", as_markdown)) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one output format, not {' and '.join('--' + c for c in chosen)}")
    return chosen[0] if chosen else "table"


def run_report(
    paths: Sequence[Path],
    *,
    allow_missing: bool = False,
    fmt: str = "table",
    table: str | None = None,
    png: Path | None = None,
    metric: str = "accuracy",
    select_by: str = "val.accuracy",
) -> Report:
    """Collect runs, select per the paper's protocol, print in ``fmt`` and write plots into ``png``.

    Raises:
        UsageError: Bad ``fmt``/``table``, an unusable ``png`` folder, or a path holding no runs;
            all checked before any run is read or any file written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    if table is not None and table not in TABLES:
        raise UsageError(f"--table must be one of {', '.join(TABLES)}, got {table!r}")
    if not paths:
        raise UsageError("give at least one run directory or folder of runs")
    check_report_metrics(metric, select_by)
    if png is not None:
        from ftsgd.report.plots import check_plot_dir

        check_plot_dir(png)
    report = collect_report(paths, allow_missing=allow_missing, metric=metric, select_by=select_by)
    plots: list[Path] = []
    if png is not None:
        from ftsgd.report.plots import write_plots

        plots = write_plots(report, png)
    for problem in report.problems:
        warn(problem)
    if fmt == "json":
        print_json({**report.to_dict(), "plots": [str(p) for p in plots]})
    elif fmt in ("csv", "markdown"):
        if fmt == "csv":
            write_csv(build_table(report, table or "selection"))
        else:
            sys.stdout.write(markdown(report, [table] if table else list(TABLES)))
        for path in plots:  # stdout holds only the table
            sys.stderr.write(f"plot: {path}\n")
    else:
        print_terminal(report, [table] if table else list(reversed(TABLES)), plots)
    return report


def print_terminal(report: Report, names: list[str], plots: list[Path]) -> None:
    """Rich tables on a terminal, plain aligned text otherwise, then the notes."""
    for name in names:
        t = build_table(report, name)
        print_table(t.title, [c.header for c in t.columns], display_rows(t))
    unfinished = [r for r in report.runs if r.status == UNFINISHED]
    if unfinished:
        info(
            f"{len(unfinished)} unfinished run(s), not in any mean: "
            + ", ".join(str(r.path) for r in unfinished)
        )
    if report.ignored_keys:
        info("differing but not grid keys (execution only): " + ", ".join(report.ignored_keys))
    for path in plots:
        info(f"plot: {path}")


# --------------------------------------------------------------------------- tables


def build_table(report: Report, name: str) -> Table:
    """The ``selection``, ``points`` or ``runs`` table of ``report``."""
    builders = {"selection": selection_table, "points": points_table, "runs": runs_table}
    return builders[name](report)


def _lead_columns(report: Report, keys: list[str]) -> list[Column]:
    """Recipe, data folder (when runs used several) and the grid keys."""
    columns = [Column("recipe", "recipe")]
    if len({r.data for r in report.runs}) > 1:
        columns.append(Column("data", "data"))
    return columns + [Column(k, k, "value") for k in keys]


def _lead_cells(report: Report, recipe: str, data: str, values: dict[str, Any], keys: list[str]) -> list[Any]:
    cells: list[Any] = [recipe]
    if len({r.data for r in report.runs}) > 1:
        cells.append(data)
    return cells + [values.get(k) for k in keys]


def _result_columns(report: Report, kind: str) -> list[Column]:
    val, ood = report.splits[0], report.ood_splits
    what = "" if report.metric == "accuracy" else f" {report.metric}"
    return [
        Column(val, f"{val} (ID){what} %", kind),
        *(Column(s, f"{s}{what} %", kind) for s in ood),
        Column("peak_memory_bytes", "peak memory", "bytes"),
        Column("train_time_s", "train time", "seconds"),
    ]


def _point_results(report: Report, point: GridPoint | None) -> list[Any]:
    if point is None:
        return [None] * (len(report.splits) + 2)
    return [
        point.val,
        *(point.splits.get(s) for s in report.ood_splits),
        point.peak_memory_bytes,
        point.train_time_s,
    ]


def _seeds(point: GridPoint | None) -> tuple[int, int, int, int] | None:
    """(finished, expected, unfinished, broken) seed counts."""
    if point is None:
        return None
    return (len(point.runs), len(point.expected_seeds), len(point.unfinished), len(point.broken))


def selection_table(report: Report) -> Table:
    """One row per recipe (and data folder): the selected grid point, mean ± std over its seeds."""
    keys = report.point_keys
    columns = [
        *_lead_columns(report, keys),
        Column("seeds", "seeds", "seeds"),
        *_result_columns(report, "stat"),
        Column("note", "note"),
    ]
    rows = []
    for s in report.selections:
        values = s.point.values if s.point else {}
        rows.append(
            [
                *_lead_cells(report, s.recipe, s.data, values, keys),
                _seeds(s.point),
                *_point_results(report, s.point),
                _selection_note(s),
            ]
        )
    by = "ID-val accuracy" if report.select_by == "val.accuracy" else report.select_by
    title = f"Selection: per recipe, the grid point with the best mean {by} (mean ± std over seeds)"
    return Table("selection", title, columns, rows)


def _selection_note(selection: Selection) -> str:
    if selection.point is None:
        return selection.reason
    notes = []
    if selection.tie:
        notes.append("tie with " + "; ".join(p.label for p in selection.tied[1:]))
    if not selection.point.complete:
        notes.append("missing seeds")
    if selection.excluded:
        notes.append(f"{len(selection.excluded)} point(s) with missing seeds left out")
    return ", ".join(notes)


def points_table(report: Report) -> Table:
    """Every grid point: what the selection compared (or left out), with its mean ± std over seeds."""
    keys = report.point_keys
    columns = [
        *_lead_columns(report, keys),
        Column("seeds", "seeds", "seeds"),
        Column("status", "status"),
        *_result_columns(report, "stat"),
    ]
    status = _point_statuses(report)
    rows = [
        [
            *_lead_cells(report, p.recipe, p.data, p.values, keys),
            _seeds(p),
            status[id(p)],
            *_point_results(report, p),
        ]
        for p in report.points
    ]
    return Table("points", "Grid points (mean ± std over finished seeds)", columns, rows)


def _point_statuses(report: Report) -> dict[int, str]:
    """``selected``, ``selected (tie)``, ``tie``, ``compared``, ``left out: missing seeds``, ``pending``
    (runs still unfinished) or ``no result``."""
    status = {id(p): "pending" if p.unfinished else "no result" for p in report.points}
    for s in report.selections:
        status.update({id(p): "compared" for p in s.compared})
        status.update({id(p): "left out: missing seeds" for p in s.excluded})
        status.update({id(p): "tie" for p in s.tied})
        if s.point is not None:
            status[id(s.point)] = "selected (tie)" if s.tie else "selected"
    return status


def runs_table(report: Report) -> Table:
    """Every run directory with its best-epoch accuracies (best so far for an unfinished run)."""
    root = _common_root(report.runs)
    columns = [
        Column("run", "run"),
        *_lead_columns(report, report.grid_keys),
        Column("status", "status"),
        Column("best_epoch", "best epoch"),
        *_result_columns(report, "acc"),
    ]
    rows = []
    for r in report.runs:
        accuracies = [r.accuracy.get(s) for s in report.splits]
        rows.append(
            [
                _run_label(r, root),
                *_lead_cells(report, r.recipe, r.data, r.values, report.grid_keys),
                _run_status(r),
                f"{r.best_epoch}/{r.epochs or '?'}" if r.best_epoch else "-",
                *accuracies,
                r.peak_memory_bytes,
                r.train_time_s,
            ]
        )
    return Table("runs", f"Runs (under {root}; accuracy at the best epoch)", columns, rows)


def _run_status(run: Run) -> str:
    if run.status == UNFINISHED:
        return f"unfinished {run.epochs_done}/{run.epochs or '?'} epochs"
    return run.status


def _common_root(runs: list[Run]) -> Path:
    paths = [str(r.path) for r in runs]
    root = Path(os.path.commonpath(paths)) if paths else Path(".")
    return root.parent if len(runs) == 1 else root


def _run_label(run: Run, root: Path) -> str:
    return str(run.path.relative_to(root)) if run.path != root else run.path.name


# --------------------------------------------------------------------------- rendering


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def human_bytes(n: int) -> str:
    """``1.25 GiB`` / ``761 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def human_seconds(s: float) -> str:
    """``42.1 s`` / ``12.5 min`` / ``3.2 h``."""
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def display_cell(kind: str, value: Any) -> str:
    """A cell for people: percentages, ``mean ± std``, sizes and durations with units."""
    if value is None:
        return "-"
    if kind == "acc":
        return _percent(value)
    if kind == "stat":
        assert isinstance(value, Stat)
        return _percent(value.mean) + (f" ± {_percent(value.std)}" if value.std is not None else "")
    if kind == "seeds":
        done, expected, unfinished, broken = value
        more = [f"{n} {what}" for n, what in ((unfinished, "unfinished"), (broken, "broken")) if n]
        return f"{done}/{expected}" + (f" ({', '.join(more)})" if more else "")
    if kind == "bytes":
        return human_bytes(value)
    if kind == "seconds":
        return human_seconds(value)
    if kind == "value":
        return display_value(value)
    return str(value)


def display_rows(table: Table) -> list[list[str]]:
    """Every row of ``table`` as display strings."""
    return [[display_cell(c.kind, v) for c, v in zip(table.columns, row, strict=True)] for row in table.rows]


def csv_headers(column: Column) -> list[str]:
    """CSV header(s) of a column: a stat becomes ``_mean``, ``_std``, ``_ci90`` and ``_n`` columns."""
    if column.kind == "stat":
        return [f"{column.key}_{part}" for part in ("mean", "std", "ci90", "n")]
    if column.kind == "seeds":
        return ["seeds", "expected_seeds", "unfinished", "broken"]
    return [column.key]


def csv_cells(column: Column, value: Any) -> list[Any]:
    """A cell for programs: raw numbers (fractions, bytes, seconds), one CSV column per part."""
    if column.kind == "stat":
        return [None] * 4 if value is None else [value.mean, value.std, value.ci90, value.n]
    if column.kind == "seeds":
        return [None] * 4 if value is None else list(value)
    if column.kind == "value" and value is not None:
        return [display_value(value)]
    return [value]


def write_csv(table: Table) -> None:
    """``table`` as CSV on stdout (empty cells for missing values)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([h for c in table.columns for h in csv_headers(c)])
    for row in table.rows:
        cells = [x for c, v in zip(table.columns, row, strict=True) for x in csv_cells(c, v)]
        writer.writerow(["" if x is None else x for x in cells])
    sys.stdout.flush()


def markdown(report: Report, names: list[str]) -> str:
    """The named tables as Markdown (a heading, then a pipe table each)."""
    parts = []
    for name in names:
        t = build_table(report, name)
        header = [c.header for c in t.columns]
        align = ["---" if c.kind in ("text", "value") else "---:" for c in t.columns]
        lines = [f"### {t.title}", "", _md_row(header), _md_row(align)]
        lines += [_md_row(row) for row in display_rows(t)]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
