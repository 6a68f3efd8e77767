"""``ftsgd report --select-by`` and ``--metric``: other metrics and the worst/mean aggregates, on runs with
known results (tests/_runs.py), from the best epoch within a run to the grid point per recipe."""

from __future__ import annotations

import json
from pathlib import Path

from _runs import write_run
from typer.testing import CliRunner

from ftsgd.cli.app import app

runner = CliRunner()


def report(*args: str) -> dict:
    result = runner.invoke(app, ["report", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def add_metrics(run: Path, sketch: float | None = None) -> None:
    """Give every split macro_f1 = accuracy - 0.1, and optionally a ``sketch`` split (epoch 2: + 0.1)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for record in lines:
        if sketch is not None:
            record["splits"]["sketch"] = {"accuracy": sketch + 0.1 * (record["epoch"] - 1), "loss": 1.0}
        for split in record["splits"].values():
            split["macro_f1"] = split["accuracy"] - 0.1
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = json.loads((run / "summary.json").read_text())
    summary["best"], summary["final"] = lines[0]["splits"], lines[-1]["splits"]
    (run / "summary.json").write_text(json.dumps(summary))


def test_select_by_worst_picks_other_epochs_and_another_grid_point(tmp_path: Path) -> None:
    data, sweep = tmp_path / "data", tmp_path / "sweep"
    # epoch 1 is the best by val; epoch 2 has val - 0.05 and ood + 0.05 (tests/_runs.py)
    write_run(sweep / "lr=0.001", data=data, lr=1e-3, val=0.6, ood=0.2)
    write_run(sweep / "lr=0.01", data=data, lr=1e-2, val=0.5, ood=0.4)
    paper = report(str(sweep))
    assert paper["selections"][0]["selected"]["grid"] == {"optim.lr": 0.001}
    assert paper["protocol"]["select_by"] == "val.accuracy"

    worst = report(str(sweep), "--select-by", "worst.accuracy")  # one split besides val: worst is ood
    selected = worst["selections"][0]["selected"]
    assert selected["grid"] == {"optim.lr": 0.01}
    assert selected["score"]["mean"] == 0.45
    assert selected["val"]["mean"] == 0.45  # the ID-val accuracy at that epoch, 2
    assert {r["grid"]["optim.lr"]: r["best_epoch"] for r in worst["runs"]} == {0.001: 2, 0.01: 2}
    assert "highest mean worst.accuracy" in worst["selections"][0]["reason"]
    # the loss is lower-is-better: val.loss is 1.0 in every epoch, so ties keep epoch 1 and the smaller lr
    loss = report(str(sweep), "--select-by", "val.loss")
    assert loss["selections"][0]["selected"]["grid"] == {"optim.lr": 0.001}


def test_metric_columns_and_aggregates_over_two_splits(tmp_path: Path) -> None:
    data, sweep = tmp_path / "data", tmp_path / "sweep"
    add_metrics(write_run(sweep / "a", data=data, lr=1e-3, val=0.6, ood=0.4), sketch=0.2)
    add_metrics(write_run(sweep / "b", data=data, lr=1e-2, val=0.5, ood=0.3), sketch=0.4)
    out = report(str(sweep), "--metric", "macro_f1")
    assert out["splits"] == ["val", "ood", "sketch", "worst", "mean"]
    runs = {r["grid"]["optim.lr"]: r for r in out["runs"]}
    shown = {k: round(v, 9) for k, v in runs[0.001]["accuracy"].items()}
    # macro-F1 at the best epoch (1): val 0.5, ood 0.3, sketch 0.1; computed worst and mean over ood, sketch
    assert shown == {"val": 0.5, "ood": 0.3, "sketch": 0.1, "worst": 0.1, "mean": 0.2}
    assert out["protocol"]["metric"] == "macro_f1"
    by_mean = report(str(sweep), "--select-by", "mean.macro_f1")
    # epoch 2 of each: the mean of ood + 0.05 and sketch + 0.1, minus 0.1: a 0.275, b 0.325
    assert by_mean["selections"][0]["selected"]["grid"] == {"optim.lr": 0.01}
    table = runner.invoke(
        app, ["report", str(sweep), "--markdown", "--metric", "macro_f1", "--table", "runs"]
    )
    assert "val (ID) macro_f1 %" in table.stdout and "worst macro_f1 %" in table.stdout


def test_bad_metric_and_select_by_are_usage_errors(tmp_path: Path) -> None:
    data, sweep = tmp_path / "data", tmp_path / "sweep"
    write_run(sweep / "a", data=data)
    for args, text in (
        (["--metric", "f1"], "--metric must be one of accuracy, top5, macro_f1, balanced_accuracy"),
        (["--select-by", "val.f1"], "--select-by: expected SPLIT.METRIC"),
        (["--select-by", "sketch.accuracy"], "--select-by sketch.accuracy: no run has it"),
    ):
        result = runner.invoke(app, ["report", str(sweep), *args])
        assert result.exit_code == 2, result.output
        assert text in result.output


def test_the_id_vs_ood_plot_has_worst_and_mean_panels(tmp_path: Path) -> None:
    from ftsgd.report.plots import id_vs_ood
    from ftsgd.report.selection import collect_report

    data, sweep = tmp_path / "data", tmp_path / "sweep"
    add_metrics(write_run(sweep / "a", data=data, val=0.6, ood=0.4), sketch=0.2)
    report = collect_report([sweep], metric="macro_f1")
    fig = id_vs_ood(report, {"sgd-freeze-embed": "C0"})
    assert fig is not None
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["ID vs ood", "ID vs sketch", "ID vs worst", "ID vs mean"]
    assert fig.axes[2].get_ylabel() == "worst macro f1 (%)"
