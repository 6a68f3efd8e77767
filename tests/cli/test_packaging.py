"""A non-editable install carries the built-in recipes, so `--recipe NAME` works outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_the_builtin_recipes_and_finds_them(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("ftsgd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if n.startswith("ftsgd/recipes/") and n.endswith(".toml"))
    assert shipped == sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import ftsgd.recipe as r; from pathlib import Path; "
        f"assert Path(r.__file__).is_relative_to(Path(r'{target}')), r.__file__; "
        "print(r.builtin_recipe_dir()); print(r.load_recipe('sgd-freeze-embed').optim.momentum)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    ran = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, env=env, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    folder, momentum = ran.stdout.split()
    assert Path(folder) == target / "ftsgd" / "recipes"
    assert float(momentum) == 0.9
