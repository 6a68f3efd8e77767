"""The docs' ``ftsgd report`` example prints the table the docs show (accuracy columns; times vary)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import _zygote as zygote
import pytest

from ftsgd.data.synthetic import make_image_folder

DOC = Path(__file__).resolve().parents[2] / "docs" / "report-and-sweep.md"


def _example() -> tuple[str, list[list[str]]]:
    """The bash block before the table, and the table's rows (recipe, lr, seeds, val, ood)."""
    text = DOC.read_text()
    start = text.index("# 2 learning rates x 2 seeds, then the comparison")
    block = text[start : text.index("```", start)]
    table = text[text.index("| recipe | optim.lr |", start) :].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")][:5] for line in table.splitlines()[2:]]
    return block, rows


@pytest.mark.slow
def test_the_report_example_prints_the_documented_table(tmp_path: Path) -> None:
    data = make_image_folder(
        tmp_path / "demo" / "data", classes=4, size=32, seed=0, per_class={"train": 48, "val": 16, "ood": 16}
    )
    block, documented = _example()
    script = block.replace("DATA", str(data))
    bin_dir = str(
        Path(zygote.launcher()).parent
    )  # `ftsgd` runs in the test zygote: real processes, no import cost
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    printed = [
        [c.strip() for c in line.strip("|").split("|")][:5]
        for line in proc.stdout.splitlines()
        if re.match(r"\| (adamw|sgd)", line)
    ]
    assert printed == documented, proc.stdout
