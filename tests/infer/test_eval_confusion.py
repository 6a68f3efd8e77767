"""ftsgd eval's confusion matrix (--json, tables, --png heatmaps) and per-class accuracy in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.cli.evaluate import print_confusion

runner = CliRunner()


def evaluate_cli(*args: str):
    return runner.invoke(app, ["eval", *args])


def test_json_confusion_rows_are_the_per_class_counts(trained_run: Path, image_folder: Path) -> None:
    result = evaluate_cli(str(trained_run), "--data", str(image_folder), "--json")
    assert result.exit_code == 0, result.stderr
    for split, r in json.loads(result.stdout).items():
        classes = list(r["per_class"])
        matrix = r["confusion"]
        assert len(matrix) == len(classes) and all(len(row) == len(classes) for row in matrix)
        assert sum(map(sum, matrix)) == r["n"] == 24, split
        for i, cls in enumerate(classes):
            assert sum(matrix[i]) == r["per_class"][cls]["n"] == 8
            assert matrix[i][i] / 8 == r["per_class"][cls]["accuracy"]
        assert sum(matrix[i][i] for i in range(len(classes))) / r["n"] == r["accuracy"]


def test_tables_and_png_heatmaps(trained_run: Path, image_folder: Path, tmp_path: Path) -> None:
    plots = tmp_path / "plots" / "eval"
    result = evaluate_cli(str(trained_run), "--data", str(image_folder), "--png", str(plots))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Confusion matrix: val (rows: true class, columns: predicted class)" in out
    assert "Confusion matrix: ood" in out and "true \\ predicted  circle" in out
    assert f"heatmap: {plots / 'confusion-val.png'}" in out
    assert sorted(p.name for p in plots.iterdir()) == ["confusion-ood.png", "confusion-val.png"]
    for png in plots.iterdir():
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 200
            img.load()  # decodes completely: not truncated
            assert len(img.getcolors(1 << 16) or range(1000)) > 10  # a drawing, not a blank page

    as_file = tmp_path / "file.png"
    as_file.write_text("x")
    refused = evaluate_cli(str(trained_run), "--data", str(image_folder), "--png", str(as_file))
    assert refused.exit_code == 2 and "is not a folder" in refused.stderr


def test_many_classes_point_to_json_and_png(capsys: pytest.CaptureFixture[str]) -> None:
    classes = [f"c{i}" for i in range(21)]
    matrix = [[int(i == j) for j in range(21)] for i in range(21)]
    few = {"accuracy": 1.0, "per_class": {"a": {}, "b": {}}, "confusion": [[1, 0], [0, 1]]}
    many = {"accuracy": 1.0, "per_class": {c: {} for c in classes}, "confusion": matrix}
    huge = {"accuracy": 1.0, "per_class": {c: {} for c in classes}}  # no matrix: too many classes to count
    print_confusion({"val": few, "big": many, "huge": huge})
    out = capsys.readouterr().out
    assert "Confusion matrix (huge): not counted for more than 1024 classes" in out
    assert "Confusion matrix: val" in out
    assert "Confusion matrix (big): 21 classes are too many for a table" in out and "--json" in out
    assert "--png DIR" in out and "c20" not in out


def test_metrics_jsonl_has_per_class_accuracy_of_val(trained_run: Path) -> None:
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        per_class = record["per_class"]["val"]
        assert list(per_class) == ["circle", "square", "triangle"]
        assert sum(c["n"] for c in per_class.values()) == record["splits"]["val"]["n"] == 24
        hits = sum(c["accuracy"] * c["n"] for c in per_class.values())
        assert hits / 24 == pytest.approx(record["splits"]["val"]["accuracy"])


def test_png_is_a_folder_in_every_command_and_a_file_name_is_refused(tmp_path: Path) -> None:
    """``eval --png plots/cm.png`` once made a folder named cm.png: such a name is now refused."""
    from ftsgd.errors import UsageError
    from ftsgd.inspect.diagnose import check_png_path
    from ftsgd.report.plots import check_plot_dir

    with pytest.raises(UsageError, match="--png takes a folder"):
        check_plot_dir(tmp_path / "plots" / "cm.png")
    with pytest.raises(UsageError, match="--png takes a folder"):
        check_png_path(tmp_path / "grads.png")
    assert check_png_path(tmp_path / "plots") == tmp_path / "plots" / "gradient_diagnostic.png"
    assert not (tmp_path / "plots").exists()
