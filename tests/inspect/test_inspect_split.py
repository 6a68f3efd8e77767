"""``ftsgd inspect --data`` on one folder of class folders: the layout and the split ftsgd train would draw."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftsgd.cli.app import app


@pytest.mark.slow
def test_inspect_data_shows_the_drawn_split(make_folder, tmp_path: Path) -> None:
    photos = make_folder({"": {"cat": 30, "dog": 10, "eel": 6}}, size=8)
    sets = ["model.kwargs={img_size=32}", "train.batch_size=4", "data.test_fraction=0.2"]
    args = [
        "inspect",
        "test_vit",
        *(a for s in sets for a in ("--set", s)),
        "--data",
        str(photos),
        "--batches",
        "1",
    ]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "data: one folder of class folders, split by ftsgd (data.val_fraction = 0.1, " in plain.stdout
    assert "data: train: 32 images (cat 21, dog 7, eel 4)" in plain.stdout
    assert "data: val: 5 images (cat 3, dog 1, eel 1)" in plain.stdout
    assert "data: test: 9 images (cat 6, dog 2, eel 1)" in plain.stdout
