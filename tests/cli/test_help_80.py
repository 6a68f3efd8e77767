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
    if command and command[0] not in ("recipes",) and len(command) == 1:
        assert examples, f"ftsgd {command[0]} -h shows no example"


def test_bracketed_texts_survive_the_help_markup() -> None:
    text = CliRunner().invoke(app, ["export", "-h"], env={"COLUMNS": "80"}, terminal_width=80).stdout
    assert "pip install 'ftsgd[onnx]'" in text and "[default: random" in text
