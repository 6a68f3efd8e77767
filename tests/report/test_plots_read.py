"""The report's plots say what they show: runs of one recipe apart, y = x on the panel, the exported epoch."""

from __future__ import annotations

from pathlib import Path

from _runs import write_run

from ftsgd.report.plots import accuracy_vs_memory, all_run_curves, id_vs_ood, recipe_colours
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


def test_accuracy_vs_memory_draws_one_marker_per_recipe_at_its_selected_peak(tmp_path: Path) -> None:
    """SGD freeze-embed (selected lr 1e-3, 700 MiB) beside LoRA (400 MiB): ID and OOD panels, mean ± std."""
    data = tmp_path / "data"
    for seed, val in ((0, 0.8), (1, 0.9)):
        write_run(tmp_path / "runs" / f"fe-{seed}", data=data, seed=seed, val=val, ood=0.5)
        write_run(
            tmp_path / "runs" / f"lora-{seed}",
            data=data,
            recipe="lora",
            lr=5e-3,
            seed=seed,
            val=val - 0.1,
            ood=0.6,
            peak=400 * 2**20,
        )
    report = collect_report([tmp_path / "runs"])
    fig = accuracy_vs_memory(report, recipe_colours(report))
    assert fig is not None
    id_ax, ood_ax = (ax for ax in fig.axes if ax.get_visible())
    assert id_ax.get_xlabel() == "peak memory (MiB)" and ood_ax.get_title() == "ood (OOD)"
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == ["lora (optim.lr=0.005; 2 seeds)", "sgd-freeze-embed (optim.lr=0.001; 2 seeds)"]
    lines = [line for line in id_ax.get_lines() if line.get_marker() != "_"]  # not the error bars' caps
    markers = {line.get_marker(): (line.get_xdata()[0], round(line.get_ydata()[0], 6)) for line in lines}
    assert len(markers) == 2  # one shape per recipe
    assert sorted(markers.values()) == [(400, 75.0), (700, 85.0)]  # peak in MiB, mean ID-val accuracy
    selections = report.to_dict()["selections"]
    assert sorted(s["peak_memory_bytes"] for s in selections) == [400 * 2**20, 700 * 2**20]
