"""Terminal and plain output of ``ftsgd.console``."""

from __future__ import annotations

import pytest

from ftsgd.utils.console import print_table


@pytest.mark.parametrize("tty", ["1", "0"])
def test_tables_print_names_with_brackets_as_they_are(
    tty: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Class folders such as ``[cat]`` or ``[bold]x`` are data, never rich markup."""
    monkeypatch.setenv("FTSGD_FORCE_TTY", tty)
    monkeypatch.setenv("COLUMNS", "120")
    print_table("per class [val]", ["class", "accuracy"], [["[cat]", "1.0"], ["[bold]dog[/bold]", None]])
    out = capsys.readouterr().out
    assert "per class [val]" in out and "[cat]" in out and "[bold]dog[/bold]" in out
