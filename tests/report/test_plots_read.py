"""The report's plots say what they show: runs of one recipe apart, y = x on the panel, the exported epoch."""

from __future__ import annotations

from pathlib import Path

from _runs import write_run

from ftsgd.report.plots import all_run_curves, id_vs_ood, recipe_colours
from ftsgd.report.selection import collect_report


def _report(tmp_path: Path):
    for lr, seed, val in ((1e-3, 0, 0.8), (1e-3, 1, 0.9), (1e-2, 0, 0.6), (1e-2, 1, 0.7)):
        write_run(
            tmp_path / "runs" / f"{lr}-{seed}", data=tmp_path / "data", lr=lr, seed=seed, val=val, ood=0.2
        )
    report = collect_report([tmp_path / "runs"])
    return report, recipe_colours(report)


def test_runs_of_one_recipe_are_told_apart_and_their_exported_epoch_is_marked(tmp_path: Path) -> None:
    report, colours = _report(tmp_path)
    fig = all_run_curves(report, colours)
    assert fig is not None
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "sgd-freeze-embed optim.lr=0.001" in labels and "sgd-freeze-embed optim.lr=0.01" in labels
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_marker() in ("None", None, "")]
    assert len({line.get_linestyle() for line in curves}) == 2  # one style per grid point
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 4 and all(list(d.get_xdata()) == [1] for d in dots)  # best epoch 1 of each run


def test_the_y_equals_x_line_crosses_every_id_vs_ood_panel_and_every_dot_is_named(tmp_path: Path) -> None:
    report, colours = _report(tmp_path)
    fig = id_vs_ood(report, colours)
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_xlim() == ax.get_ylim()  # one range, so y = x runs corner to corner
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "sgd-freeze-embed: every run" in labels and any(label.endswith("selected") for label in labels)
