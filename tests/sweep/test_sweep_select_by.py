"""``ftsgd sweep --metric/--select-by`` are the report's, checked before any run is planned or started."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ftsgd.cli.app import app


def test_a_bad_metric_or_select_by_stops_the_sweep_before_it_starts(
    image_folder: Path, tmp_path: Path
) -> None:
    base = ["sweep", "--data", str(image_folder), "--out", str(tmp_path / "sweep"), "--model", "test_vit"]
    for args, text in (
        (["--metric", "f1"], "--metric must be one of accuracy, top5, macro_f1, balanced_accuracy"),
        (["--select-by", "worst.f1"], "--select-by: expected SPLIT.METRIC"),
    ):
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2, result.output
        assert text in result.output
        assert not (tmp_path / "sweep").exists()
