"""Recipe checks that need timm or the file system, merged into one error with the recipe's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsgd.errors import RecipeError
from ftsgd.run.checks import load_checked_recipe


def test_environment_problems_each_name_their_key(tmp_path: Path, image_folder: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe(
            "sgd",
            [
                'model.name="vit_bse_patch16_224"',
                'optim.name="adamww"',
                f'data.root="{image_folder}"',
                'data.eval_splits=["ood", "nope"]',
                "train.epochs=0",  # a problem of the recipe itself, in the same error
            ],
        )
    problems = exc.value.problems
    assert len(problems) == 4, problems
    assert any(
        p.startswith("model.name: unknown model 'vit_bse_patch16_224'; did you mean") for p in problems
    )
    assert any(p.startswith("optim.name: unknown optimizer 'adamww'; did you mean adamw") for p in problems)
    assert any(
        p.startswith("data.eval_splits[1]: split folder") and "nope does not exist" in p for p in problems
    )
    assert any(p.startswith("train.epochs: must be >= 1") for p in problems)


def test_weights_that_are_missing_or_a_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"model\.weights: file not found: /nonexistent/w\.safetensors"):
        load_checked_recipe("sgd", ['model.weights="/nonexistent/w.safetensors"'])
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(
        RecipeError, match=r"model\.weights: weights directory .* holds none of model\.safetensors"
    ):
        load_checked_recipe("sgd", [f'model.weights="{folder}"'])
    (folder / "model.safetensors").write_bytes(b"")
    assert load_checked_recipe("sgd", [f'model.weights="{folder}"']).model.weights == str(folder)


def test_missing_dataset_folders(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"data\.root: dataset folder .*nope does not exist \(--data\)"):
        load_checked_recipe("sgd", [f'data.root="{tmp_path / "nope"}"'])
    (tmp_path / "train").mkdir()
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe("sgd", [f'data.root="{tmp_path}"'])
    assert exc.value.problems == [f"data.val: split folder {tmp_path / 'val'} does not exist"]


def test_hub_and_local_sources_are_checked_when_built() -> None:
    assert load_checked_recipe("sgd", ['model.name="hf-hub:timm/x"']).model.name == "hf-hub:timm/x"
