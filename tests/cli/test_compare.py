"""``ftsgd demo --compare --quick``: the comparison table's rows and columns, its sweep folder, caching and safe reruns."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.sweep.compare import METHODS, QUICK

COLUMNS = [
    "method",
    "best lr",
    "seeds",
    "ID val %",
    "OOD %",
    "train-state memory",
    "bytes/param",
    "vs adamw",
    "peak (measured)",
]


def compare(out: Path, cache: Path, *extra: str):
    return CliRunner().invoke(
        app, ["demo", "--compare", "--quick", "--out", str(out), *extra], env={"XDG_CACHE_HOME": str(cache)}
    )


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("compare")
    result = compare(root / "out", root / "cache")
    assert result.exit_code == 0, result.output
    return root / "out", root / "cache", result.output


def _table(output: str, title: str) -> list[list[str]]:
    """The plain-text table after ``title``: its header and rows, split on runs of two spaces."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    table = []
    for line in lines[start + 1 :]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if not cells or line.startswith(("backbone:", "time:")):
            break
        table.append(cells)
    return table


@pytest.mark.slow
def test_the_comparison_table_has_a_row_per_method_and_its_columns(first: tuple[Path, Path, str]) -> None:
    out, _, output = first
    header, *rows = _table(output, "Comparison: per method")
    assert header == COLUMNS
    assert [r[0] for r in rows] == list(METHODS)
    for row in rows:
        method = row[0]
        assert float(row[1]) in QUICK.lrs[method]  # the selected lr is one of the method's grid
        assert row[2] == "1/1"
        assert 0 <= float(row[3]) <= 100 and 0 <= float(row[4]) <= 100
    per_param = {r[0]: float(r[6]) for r in rows}
    assert per_param["adamw"] == 16.0 and per_param["sgd"] == 12.0  # the paper's bytes/parameter
    assert per_param["sgd-freeze-embed"] < 12.0
    assert per_param["lora-sgd-freeze-embed"] < per_param["lora"] < per_param["sgd-freeze-embed"]
    assert "recommendation:" in output and "Grid points" in output
    assert "fine-tuning precision: fp32 (train.amp = 'auto'" in output  # the CPU default, fp32

    saved = json.loads((out / "comparison.json").read_text())
    assert saved["precision"] == "none" and saved["config"]["amp"] == "auto"
    assert {json.loads(p.read_text())["amp"] for p in out.rglob("summary.json")} == {"none"}
    assert [r["method"] for r in saved["rows"]] == list(METHODS)
    for row, shown in zip(saved["rows"], rows, strict=True):
        assert f"{row['lr']:g}" == shown[1]
        assert f"{100 * row['val']['mean']:.1f}" == shown[3] and f"{100 * row['ood']['mean']:.1f}" == shown[4]
    assert saved["diagnostic"]["groups"][0]["kind"] == "embedding"
    runs = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json"))
    assert runs == sorted(
        f"{m}/optim.lr={lr!r},train.seed={s}"
        for m in METHODS
        for lr in QUICK.lrs[m]
        for s in range(QUICK.seeds)
    )


@pytest.mark.slow
def test_the_output_folder_is_a_sweep_folder(first: tuple[Path, Path, str], tmp_path: Path) -> None:
    """``sweep.json`` records every run as ``ftsgd sweep`` does; ``ftsgd report`` and ``ftsgd sweep`` read it."""
    out, _, _ = first
    saved = json.loads((out / "comparison.json").read_text())
    record = json.loads((out / "sweep.json").read_text())
    assert record["state"] == "finished" and record["counts"]["finished"] == len(record["runs"]) == 6
    assert {r["name"]: r["grid"]["optim.lr"] for r in record["recipes"]} == {
        m: list(QUICK.lrs[m]) for m in METHODS
    }
    assert all(
        r["command"].startswith("ftsgd train --data ") and r["command"].endswith(" --resume --quiet")
        for r in record["runs"]
    )
    assert record["selection"] == saved["report"]

    report = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["selections"] == saved["report"]["selections"]

    # `ftsgd sweep` continues the folder (a copy) with one run's own flags: it trains nothing, selects
    shutil.copytree(out, tmp_path / "copy")
    sgd = next(r for r in record["runs"] if r["recipe"] == "sgd")
    words = shlex.split(sgd["command"])[2:-2]  # train's flags, without --resume --quiet
    flags = []
    for flag, value in zip(words[::2], words[1::2], strict=True):
        value = str(tmp_path / "copy") if flag == "--out" else value
        flag = "--grid" if flag == "--set" and value.split("=")[0] in sgd["grid"] else flag
        flags += [flag, value]
    swept = CliRunner().invoke(app, ["sweep", *flags, "--allow-changed-grid", "--json"])
    assert swept.exit_code == 0, swept.output
    document = json.loads(swept.stdout)
    assert document["counts"]["finished"] == 1 and len(document["outside_grid"]) == 5
    assert document["runs"][0]["path"] == str(tmp_path / "copy" / Path(sgd["path"]).relative_to(out))


@pytest.mark.slow
def test_a_rerun_reuses_the_cached_backbone_and_the_finished_runs(first: tuple[Path, Path, str]) -> None:
    out, cache, output = first
    assert "pre-training the backbone" in output
    again = compare(out, cache)
    assert again.exit_code == 0, again.output
    assert "pre-training the backbone" not in again.output and "cached:" in again.output
    assert again.output.count("finished before") == sum(len(v) for v in QUICK.lrs.values()) * QUICK.seeds
    assert "0 to train" in again.output
    assert _table(again.output, "Comparison: per method") == _table(output, "Comparison: per method")


@pytest.mark.slow
def test_other_settings_or_other_files_in_out_are_refused(
    first: tuple[Path, Path, str], tmp_path: Path
) -> None:
    out, cache, _ = first
    full = CliRunner().invoke(
        app, ["demo", "--compare", "--out", str(out)], env={"XDG_CACHE_HOME": str(cache)}
    )
    assert full.exit_code == 2 and "other settings" in full.output and "--force" in full.output
    bf16 = compare(out, cache, "--amp", "bf16")  # another precision is another comparison
    assert bf16.exit_code == 2 and "other settings" in bf16.output
    (tmp_path / "mine.txt").write_text("keep me")
    refused = compare(tmp_path, cache, "--force")
    assert refused.exit_code == 2 and "not a comparison folder" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # not even a lock file was left
    (tmp_path / "mine.txt").unlink()
    (tmp_path / "data").mkdir()
    (tmp_path / "sgd").mkdir()  # a comparison's names, but no marker: not a comparison's folder
    (tmp_path / "data" / "mine.txt").write_text("keep me")
    refused = compare(tmp_path, cache, "--force")
    assert refused.exit_code == 2 and ".ftsgd-demo marker" in refused.output
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "--epochs", "3"], "--epochs is for the plain demo"),
        (["--quick"], "--quick belongs to --compare"),
        (["--amp", "bf16"], "--amp belongs to --compare"),
        (["--compare", "--amp", "fp16"], "--amp must be one of auto, none, bf16"),
    ],
)
def test_demo_options_that_do_not_go_together(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output
