"""Every ``-h`` reads cleanly in an 80-column terminal: nothing swallowed, nothing cut, examples copyable."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from ftsgd.cli.app import app


def _commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    out: list[list[str]] = [[]]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        out.append([name])
        out.extend([name, sub] for sub in getattr(command, "commands", {}))
    return out


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "ftsgd")
def test_help_fits_80_columns_and_keeps_its_brackets_and_examples(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "-h"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    examples = [line.strip() for line in lines if line.strip().startswith("ftsgd ")]
    for i, line in enumerate(lines[:-1]):  # a copied example is one command: it wraps only after a backslash
        text = line.strip()
        if (text.startswith("ftsgd ") or "| ftsgd " in text) and not text.endswith("\\"):
            assert not lines[i + 1].strip(), f"an example was wrapped without a backslash: {text!r}"
    if " Examples:" in lines:  # every example line keeps its indentation: none was wrapped to the margin
        block = lines[lines.index(" Examples:") + 1 :]
        block = block[
            : next((i for i, line in enumerate(block) if line.startswith(("╭", " Exit"))), len(block))
        ]
        assert [line for line in block if line.strip() and not line.startswith("     ")] == []
    if command and command[0] not in ("recipes",) and len(command) == 1:
        assert examples, f"ftsgd {command[0]} -h shows no example"


def test_bracketed_texts_survive_the_help_markup() -> None:
    text = CliRunner().invoke(app, ["export", "-h"], env={"COLUMNS": "80"}, terminal_width=80).stdout
    assert "pip install 'ftsgd[onnx]'" in text and "[default: random" in text


def test_tables_too_wide_for_80_columns_become_records_with_every_header_and_cell_whole(tmp_path) -> None:
    from _runs import write_run

    from ftsgd.recipe.dump import describe_keys

    tty80 = {"COLUMNS": "80", "FTSGD_FORCE_TTY": "1"}
    keys = CliRunner().invoke(app, ["recipes", "keys"], env=tty80, terminal_width=80)
    assert keys.exit_code == 0, keys.output
    flat = " ".join(keys.stdout.split())
    assert "…" not in keys.stdout
    for key, _kind, _default, description in describe_keys():
        assert f"key: {key}" in flat and " ".join(description.split()) in flat, key
    for lr, seed in ((1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-2, 1)):
        write_run(tmp_path / "runs" / f"{lr}-{seed}", data=tmp_path / "data", lr=lr, seed=seed)
    report = CliRunner().invoke(app, ["report", str(tmp_path / "runs")], env=tty80, terminal_width=80)
    assert report.exit_code == 0, report.output
    assert "…" not in report.stdout and "optim.lr" in report.stdout and "train.seed" in report.stdout
