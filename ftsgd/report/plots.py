"""Plots of a report, as PNG files: learning curves and ID-vs-OOD accuracy, in the style of the paper.

matplotlib is imported only here and only when plots are asked for (a report without ``--png`` does not
pay for it). Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot, so
no global backend or figure registry is touched: Agg renders them, and a notebook or GUI that imports
ftsgd keeps its own backend. Each PNG is rendered in memory and written atomically.

Files written (each only when it has something to show):

* ``learning_curves.png``: per selected grid point, train loss and each split's accuracy per epoch:
  every seed as a thin line, the mean over seeds as a thick one.
* ``learning_curves_all_runs.png``: the same panels for every run (unfinished ones dashed), coloured by
  recipe, to see at a glance which learning rates diverged or were still improving.
* ``id_vs_ood.png``: one panel per OOD split, ID-val accuracy against that split's accuracy at the best
  epoch for every finished run, the selected points marked with ± std error bars (the paper's
  ID/OOD comparison).
* ``accuracy_vs_memory.png``: one panel for ID-val and one per OOD split, each recipe's selected point
  (mean ± std over its seeds) against its measured peak memory, one marker per recipe: what each recipe
  buys per GiB (SGD freeze-embed, AdamW, LoRA side by side).

``ftsgd eval --png DIR`` draws each split's confusion matrix the same way (:func:`write_confusion_plots`):
``confusion-SPLIT.png``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftsgd.errors import UsageError
from ftsgd.report.selection import GridPoint, Report
from ftsgd.run.collect import FINISHED, UNFINISHED, Run
from ftsgd.utils.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CURVES = "learning_curves.png"
CURVES_ALL = "learning_curves_all_runs.png"
SCATTER = "id_vs_ood.png"
MEMORY = "accuracy_vs_memory.png"
DPI = 100
PANEL = (4.6, 3.6)
"""Inches per panel: at :data:`DPI` a one-panel figure is 460x360 pixels."""


def check_plot_dir(out: Path) -> None:
    """Fail before any work when ``out`` cannot hold plots or matplotlib is missing.

    Raises:
        UsageError: ``out`` exists and is not a folder, or matplotlib cannot be imported.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--png {out} exists and is not a folder; give a folder for the plots")
    if not out.exists() and out.suffix.lower() == ".png":  # eval --png plots/cm.png made a folder "cm.png"
        raise UsageError(
            f"--png {out}: --png takes a folder for the plots, not a file name; e.g. --png {out.parent}"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--png needs matplotlib ({exc}); install it: pip install matplotlib") from None


def write_plots(report: Report, out: Path) -> list[Path]:
    """Write every plot that has data into ``out`` (created if needed); return the files written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the plot folder {out}: {exc.strerror or exc}") from None
    colours = recipe_colours(report)
    written = []
    for name, figure in (
        (CURVES, selected_curves(report, colours)),
        (CURVES_ALL, all_run_curves(report, colours)),
        (SCATTER, id_vs_ood(report, colours)),
        (MEMORY, accuracy_vs_memory(report, colours)),
    ):
        if figure is not None:
            save_png(figure, out / name)
            written.append(out / name)
    return written


def save_png(figure: Figure, path: Path) -> None:
    """Render ``figure`` to PNG in memory, then write it atomically (a kill never leaves half a PNG)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def recipe_colours(report: Report) -> dict[str, Any]:
    """One tab10 colour per recipe, by sorted name, so a recipe keeps its colour across the figures."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    recipes = sorted({r.recipe for r in report.runs})
    return {name: palette(i % 10) for i, name in enumerate(recipes)}


def _grid(n_panels: int, title: str, legend_entries: int) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes, at most 4 per row, unused cells hidden, room for the legend below."""
    from matplotlib.figure import Figure

    ncols = min(n_panels, 4)
    nrows = math.ceil(n_panels / ncols)
    legend_rows = math.ceil(legend_entries / min(3, ncols))
    height = PANEL[1] * nrows + 0.4 + 0.22 * legend_rows
    fig = Figure(figsize=(PANEL[0] * ncols, height), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _curve_panels(report: Report, title: str, legend_entries: int) -> tuple[Figure, dict[str, Axes]]:
    """Train loss plus one accuracy panel per split, labelled."""
    from matplotlib.ticker import MaxNLocator

    names = ["train_loss", *report.splits]
    fig, axes = _grid(len(names), title, legend_entries)
    panels = dict(zip(names, axes, strict=True))
    for name, ax in panels.items():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss" if name == "train_loss" else f"{name} accuracy (%)")
        ax.set_title("train loss" if name == "train_loss" else f"{name} accuracy")
        ax.grid(alpha=0.3)
    return fig, panels


def curve(run: Run, name: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one curve: ``train_loss`` or a split's accuracy in percent."""
    xs, ys = [], []
    for record in run.history:
        if name == "train_loss":
            value = record.get("train_loss")
        else:
            value = (record["splits"].get(name) or {}).get("accuracy")
            value = 100 * value if isinstance(value, int | float) else None
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(int(record.get("epoch", len(xs) + 1)))
            ys.append(float(value))
    return xs, ys


def _mean_curve(runs: list[Run], name: str) -> tuple[list[int], list[float]]:
    """The mean over runs, on the epochs every run has."""
    curves = [dict(zip(*curve(r, name), strict=True)) for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return common, [sum(c[e] for c in curves) / len(curves) for e in common]


def selected_curves(report: Report, colours: dict[str, Any]) -> Figure | None:
    """Learning curves of each selected grid point: seeds thin, their mean thick."""
    points = [s.point for s in report.selections if s.point is not None]
    if not any(r.history for p in points for r in p.runs):
        return None
    fig, panels = _curve_panels(report, "Learning curves of the selected grid points", len(points))
    styles = ["-", "--", ":", "-."]
    for i, point in enumerate(points):
        colour, style = colours[point.recipe], styles[i // 10 % len(styles)]
        for name, ax in panels.items():
            for run in point.runs:
                ax.plot(*curve(run, name), color=colour, linestyle=style, alpha=0.3, linewidth=1)
                _mark_best(ax, run, name, colour)
            ax.plot(*_mean_curve(point.runs, name), color=colour, linestyle=style, linewidth=2.2)
    _legend(fig, [(_point_name(p), colours[p.recipe], styles[i // 10 % 4]) for i, p in enumerate(points)])
    return fig


def _point_name(point: GridPoint) -> str:
    seeds = f"{len(point.runs)} seed{'s' if len(point.runs) != 1 else ''}"
    return f"{point.recipe} ({point.label}; {seeds})" if point.values else f"{point.recipe} ({seeds})"


def _legend(fig: Figure, entries: list[tuple[str, Any, str]]) -> None:
    """One legend for the figure: a line per entry ``(label, colour, line style)``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle=s, linewidth=2) for _, c, s in entries]
    _figure_legend(fig, handles, [label for label, _, _ in entries])


def _figure_legend(fig: Figure, handles: list[Any], labels: list[str]) -> None:
    """A legend below the panels (never over the data), one column per panel column, at most 3."""
    columns = min(
        3, len(labels), sum(1 for ax in fig.axes if ax.get_visible() and ax.get_subplotspec().is_first_row())
    )
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, columns), fontsize="small")


_STYLES = ["-", "--", ":", "-."]


def _run_label(report: Report, run: Run) -> str:
    """The run's grid point within its recipe (its non-seed grid values), e.g. ``optim.lr=0.001``."""
    keys = report.point_keys
    return ",".join(f"{k}={run.values.get(k)}" for k in keys) or "runs"


def all_run_curves(report: Report, colours: dict[str, Any]) -> Figure | None:
    """Learning curves of every run with a history: colour by recipe, line style by grid point (so the runs of
    one recipe can be told apart, each point named in the legend); unfinished runs faint; the exported
    (best) epoch of each run marked with a dot."""
    runs = [r for r in report.runs if r.history]
    if not runs:
        return None
    styles: dict[tuple[str, str], str] = {}
    for run in runs:
        per_recipe = sum(1 for recipe, _ in styles if recipe == run.recipe)
        styles.setdefault((run.recipe, _run_label(report, run)), _STYLES[per_recipe % len(_STYLES)])
    fig, panels = _curve_panels(report, f"Learning curves of all {len(runs)} runs", len(styles) + 1)
    for run in runs:
        style = styles[(run.recipe, _run_label(report, run))]
        alpha = 0.3 if run.status == UNFINISHED else 0.7
        for name, ax in panels.items():
            ax.plot(*curve(run, name), color=colours[run.recipe], linestyle=style, alpha=alpha, linewidth=1)
            _mark_best(ax, run, name, colours[run.recipe])
    entries = [(f"{recipe} {label}", colours[recipe], style) for (recipe, label), style in styles.items()]
    if any(r.status == UNFINISHED for r in runs):
        entries.append(("unfinished (faint)", "grey", "-"))
    _legend(fig, entries)
    return fig


def _mark_best(ax: Axes, run: Run, name: str, colour: Any) -> None:
    """A dot on the epoch whose weights were exported (the run's best epoch)."""
    epochs, values = curve(run, name)
    if run.best_epoch in epochs:
        ax.plot([run.best_epoch], [values[epochs.index(run.best_epoch)]], "o", color=colour, markersize=4)


def id_vs_ood(report: Report, colours: dict[str, Any]) -> Figure | None:
    """ID-val against each OOD split's accuracy (``--metric``) at the best epoch, and against ``worst`` and
    ``mean`` over them when recorded; selected points starred with ± std."""
    finished = [r for r in report.runs if r.status == FINISHED and r.val_accuracy is not None]
    splits = [s for s in report.ood_splits if any(s in r.accuracy for r in finished)]
    if not splits:
        return None
    entries = len(colours) + len(report.selections) + 1
    what = report.metric.replace("_", " ")
    fig, axes = _grid(len(splits), f"Best-epoch {what}: ID vs OOD (★ selected, ± std)", entries)
    for split, ax in zip(splits, axes, strict=True):
        _scatter_panel(ax, report, split, finished, colours)
    labelled: dict[str, Any] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        labelled.update({label: h for h, label in zip(handles, labels, strict=True) if label not in labelled})
    _figure_legend(fig, list(labelled.values()), list(labelled))
    return fig


def _scatter_panel(ax: Axes, report: Report, split: str, runs: list[Run], colours: dict[str, Any]) -> None:
    """One OOD split: every run as a dot, each selected point as a star with ± std bars, and y = x."""
    xs_all: list[float] = []
    ys_all: list[float] = []
    for recipe, colour in colours.items():
        mine = [r for r in runs if r.recipe == recipe and split in r.accuracy]
        if mine:
            xs = [100 * (r.val_accuracy or 0.0) for r in mine]
            ys = [100 * r.accuracy[split] for r in mine]
            ax.scatter(xs, ys, s=22, color=colour, alpha=0.5, label=f"{recipe}: every run")
            xs_all += xs
            ys_all += ys
    for p in (s.point for s in report.selections):
        if p is None or p.val is None or split not in p.splits:
            continue
        x, y = p.val, p.splits[split]
        xerr, yerr = 100 * (x.std or 0.0), 100 * (y.std or 0.0)
        ax.errorbar(
            100 * x.mean,
            100 * y.mean,
            xerr=xerr,
            yerr=yerr,
            marker="*",
            markersize=16,
            color=colours[p.recipe],
            markeredgecolor="black",
            capsize=3,
            label=f"{_point_name(p)} selected",
        )
        xs_all += [100 * x.mean - xerr, 100 * x.mean + xerr]
        ys_all += [100 * y.mean - yerr, 100 * y.mean + yerr]
    # one range for both axes, so the y = x line always crosses the panel (ID vs OOD is read against it)
    low, high = min(xs_all + ys_all), max(xs_all + ys_all)
    pad = max(2.0, 0.1 * (high - low))
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.axline((0, 0), slope=1, linestyle=":", color="grey", linewidth=1, label="y = x")  # no autoscale
    what = report.metric.replace("_", " ")
    ax.set_xlabel(f"{report.splits[0]} (ID) {what} (%)")
    ax.set_ylabel(f"{split} {what} (%)")
    ax.set_title(f"ID vs {split}")
    ax.grid(alpha=0.3)


_MARKERS = "osD^vP*Xph"
"""One marker shape per recipe (with its colour), so recipes stay apart in grey print too."""


def accuracy_vs_memory(report: Report, colours: dict[str, Any]) -> Figure | None:
    """Each recipe's selected point: accuracy (``--metric``, mean ± std over seeds) against peak memory.

    One panel for the ID-val split and one per OOD split; the x axis is the point's peak memory (the
    largest over its seeds, what a run of it needs), in MiB or GiB. None when no selected point has both.
    """
    points = [
        s.point
        for s in report.selections
        if s.point is not None and s.point.peak_memory_bytes and s.point.val is not None
    ]
    if not points:
        return None
    splits = [report.splits[0], *[s for s in report.ood_splits if any(s in p.splits for p in points)]]
    gib = max(p.peak_memory_bytes or 0 for p in points) >= 2**30
    unit, scale = ("GiB", 2**30) if gib else ("MiB", 2**20)
    what = report.metric.replace("_", " ")
    fig, axes = _grid(len(splits), f"Selected {what} vs peak memory (mean ± std over seeds)", len(points))
    markers = {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(colours)}
    for split, ax in zip(splits, axes, strict=True):
        for p in points:
            stat = p.val if split == report.splits[0] else p.splits.get(split)
            if stat is None:
                continue
            ax.errorbar(
                (p.peak_memory_bytes or 0) / scale,
                100 * stat.mean,
                yerr=100 * (stat.std or 0.0),
                marker=markers.get(p.recipe, "o"),
                markersize=9,
                linestyle="none",
                color=colours.get(p.recipe),
                markeredgecolor="black",
                capsize=3,
                label=_point_name(p),
            )
        kind = "ID" if split == report.splits[0] else "OOD"
        ax.set_xlabel(f"peak memory ({unit})")
        ax.set_ylabel(f"{split} {what} (%)")
        ax.set_title(f"{split} ({kind})")
        ax.margins(x=0.15, y=0.15)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels)
    return fig


CONFUSION = "confusion-{split}.png"
"""``ftsgd eval --png DIR``: the file of each split's confusion-matrix heatmap."""
_ANNOTATE_UP_TO = 30
"""Classes up to which every cell of a confusion heatmap shows its count."""
_LABEL_UP_TO = 60
"""Classes up to which the axes of a confusion heatmap name every class."""


def write_confusion_plots(results: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """A confusion-matrix heatmap per split of ``ftsgd eval`` results, each written atomically."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the plot folder {out}: {exc.strerror or exc}") from None
    written = []
    for split, r in results.items():
        if "confusion" not in r:  # not counted for this many classes
            continue
        title = f"{split}: accuracy {100 * r['accuracy']:.2f}% ({r['n']} images)"
        path = out / CONFUSION.format(split=split)
        save_png(confusion_figure(r["confusion"], list(r["per_class"]), title), path)
        written.append(path)
    return written


def confusion_figure(matrix: list[list[int]], class_names: list[str], title: str) -> Figure:
    """A confusion-matrix heatmap: rows are true classes, columns predicted classes.

    Each cell's colour is the fraction of its row (how much of a true class went where), so a small
    class is as visible as a large one; the cell's text is the image count.
    """
    from matplotlib.figure import Figure

    k = len(class_names)
    fractions = [[c / max(sum(row), 1) for c in row] for row in matrix]
    side = min(40.0, max(4.0, 0.45 * k + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the true class", shrink=0.8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= _LABEL_UP_TO:
        ax.set_xticks(range(k), class_names, rotation=90 if k > 6 else 0)
        ax.set_yticks(range(k), class_names)
    if k <= _ANNOTATE_UP_TO:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                colour = "white" if fractions[i][j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour)
    return fig
