"""``ftsgd recipes`` and its sub-commands print text: they import neither torch nor timm."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from typer.testing import CliRunner
from ftsgd.cli.app import app
for args in (["recipes"], ["recipes", "keys"], ["recipes", "show", "sgd-freeze-embed", "--set", "optim.lr=0.1"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
loaded = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
print(",".join(loaded) or "none")
"""


@pytest.mark.slow
def test_recipes_commands_import_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none"
