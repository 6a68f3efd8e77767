"""``ftsgd --help`` and ``ftsgd report`` start without torch: the CLI imports a command's code when it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _runs import write_run

HEAVY = ("torch", "timm", "numpy", "PIL")


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -m ftsgd ARGS`` and return it with the top-level packages it imported (``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ftsgd", *args], capture_output=True, text=True
    )
    modules = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return done, modules


def test_help_and_report_import_no_torch(tmp_path: Path) -> None:
    for args in (["--help"], ["train", "--help"]):
        done, modules = imported(*args)
        assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr
        assert "typer" in modules and not modules & set(HEAVY), (args, modules & set(HEAVY))
    write_run(tmp_path / "runs" / "a", data=tmp_path / "data", val=0.75)
    done, modules = imported("report", str(tmp_path / "runs"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["accuracy"]["val"] == 0.75
    assert "ftsgd" in modules and not modules & set(HEAVY), modules & set(HEAVY)
