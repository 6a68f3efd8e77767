"""Evaluation splits that share images with the training split are refused before anything trains."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.folders import discover_splits
from ftsgd.data.overlap import split_overlaps
from ftsgd.recipe.load import load_recipe

TINY = ["--model", "test_vit", "--set", "model.kwargs={img_size=32}", "--set", "train.epochs=1", "--quiet"]


def test_a_linked_or_same_folder_counts_its_shared_files(make_folder) -> None:
    root = make_folder({"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}, "ood": {"a": 1, "b": 1}})
    os.link(
        root / "train" / "a" / sorted(os.listdir(root / "train" / "a"))[0], root / "ood" / "a" / "hard.png"
    )
    (root / "linked").mkdir()
    (root / "linked" / "a").symlink_to(root / "train" / "a")
    (root / "linked" / "b").symlink_to(root / "val" / "b")
    recipe = load_recipe("sgd", [f'data.root="{root}"', 'data.eval_splits=["ood", "linked"]'])
    _, splits = discover_splits(recipe.data)
    assert split_overlaps(splits) == {"ood": 1, "linked": 3}


def test_training_on_the_validation_images_is_refused_naming_the_count(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 3, "b": 3}})
    same = ["--set", 'data.train="train"', "--set", 'data.val="train"']
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(out), *TINY, *same])
    assert result.exit_code == 2, result.output
    assert "val shares 6 of its 6 file(s) with train" in result.output
    assert "data.allow_split_overlap = true" in result.output and not out.exists()
    allowed = [*same, "--set", "data.allow_split_overlap=true"]
    result = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(out), *TINY, *allowed])
    assert result.exit_code == 0, result.output
    assert "val shares 6 of its 6 file(s) with train: its numbers are measured partly on training images" in (
        result.output
    )
    assert (out / "summary.json").exists()
