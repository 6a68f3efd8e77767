"""model.reset_head: "auto" (re-initialise a classifier that does not fit), true (always fresh), false (keep).

Checked with real weight files (a local file, and timm's own loading through an export's ``local-dir:``
source, which is the ``model.pretrained`` path without a network), by comparing the classifier's tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ftsgd.errors import ModelError, RecipeError, WeightsError
from ftsgd.model.build import build_model
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import ModelConfig
from ftsgd.train.trainer import Trainer


def weights_file(tmp_path: Path, num_classes: int) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    model = timm.create_model("test_vit", img_size=32, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"vit-{num_classes}.safetensors"
    save_file(state, str(path))
    return path, state


def build(path: Path | str, reset_head, num_classes: int = 3, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="test_vit", weights=str(path), kwargs={"img_size": 32}, reset_head=reset_head, **kw
    )
    return build_model(cfg, num_classes)


def test_reset_head_decides_what_happens_to_a_fitting_classifier(tmp_path: Path) -> None:
    path, state = weights_file(tmp_path, num_classes=3)
    kept, report = build(path, "auto")
    assert torch.equal(kept.head.weight, state["head.weight"]) and report.reinitialised == ()
    assert report.head == "kept from the weights (3 classes; model.reset_head = true starts a fresh one)"
    fresh, report = build(path, True)
    assert not torch.equal(fresh.head.weight, state["head.weight"])
    assert report.reinitialised == ("head.weight", "head.bias")
    assert report.head == "re-initialised for 3 classes (model.reset_head = true)"
    # the fresh head is the one a random init gets: same seed, same values
    torch.manual_seed(0)
    assert torch.equal(
        fresh.head.weight, timm.create_model("test_vit", img_size=32, num_classes=3).head.weight
    )
    assert torch.equal(fresh.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])  # the rest is loaded
    also_kept, _ = build(path, False)
    assert torch.equal(also_kept.head.weight, state["head.weight"])


def test_reset_head_false_refuses_a_classifier_that_does_not_fit(tmp_path: Path) -> None:
    path, _ = weights_file(tmp_path, num_classes=1000)
    _, report = build(path, "auto")
    assert report.reinitialised == ("head.weight", "head.bias")
    assert (
        report.head
        == "re-initialised for 3 classes (the weights' classifier has (1000, 64) where the task needs (3, 64))"
    )
    with pytest.raises(
        WeightsError, match=r"model.reset_head = false keeps the classifier of .*\(1000, 64\)"
    ) as exc:
        build(path, False)
    assert exc.value.exit_code == 2
    headless = tmp_path / "headless.safetensors"
    save_file(
        {k: v for k, v in weights_file(tmp_path, 3)[1].items() if not k.startswith("head.")}, str(headless)
    )
    with pytest.raises(WeightsError, match="the weights have no classifier"):
        build(headless, False)


def test_reset_head_values_are_checked() -> None:
    with pytest.raises(RecipeError, match=r'model.reset_head: expected true, false or "auto", got \'yes\''):
        load_recipe(None, ['model.reset_head="yes"'])
    with pytest.raises(RecipeError, match=r"model\.reset_head: expected a boolean or string, got 1"):
        load_recipe(None, ["model.reset_head=1"])
    assert load_recipe(None, ["model.reset_head=true"]).model.reset_head is True


def test_timm_s_own_loading_follows_reset_head(image_folder: Path, tmp_path: Path) -> None:
    """model.pretrained: timm loads the weights (here from an export's local-dir), ftsgd applies reset_head."""
    out = tmp_path / "export"
    recipe = load_recipe(
        "sgd", ['model.name="test_vit"', "model.kwargs={img_size=32}", f'data.root="{image_folder}"']
    )
    source = Trainer(recipe, out, quiet=True)
    source.setup()
    source.export()
    head = source.model.head.weight.detach().clone()
    name = f"local-dir:{out}"
    kept, _ = build_model(ModelConfig(name=name, pretrained=True), 3)
    assert torch.equal(kept.head.weight, head)
    torch.manual_seed(0)
    fresh, _ = build_model(ModelConfig(name=name, pretrained=True, reset_head=True), 3)
    assert not torch.equal(fresh.head.weight, head)
    assert torch.equal(fresh.blocks[0].mlp.fc1.weight, source.model.blocks[0].mlp.fc1.weight)
    with pytest.raises(
        ModelError,
        match=r"model\.reset_head = false keeps the pretrained classifier .* 3 classes and the task 2",
    ):
        build_model(ModelConfig(name=name, pretrained=True, reset_head=False), 2)


def test_the_start_of_a_run_says_what_happened_to_the_classifier(make_folder, tmp_path: Path, capsys) -> None:
    path, _ = weights_file(tmp_path, num_classes=1000)
    data = make_folder({"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}}, size=32)
    recipe = load_recipe(
        "sgd-freeze-embed",
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f'model.weights="{path}"',
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="none"',
            "train.epochs=1",
            "train.batch_size=8",
        ],
    )
    Trainer(recipe, tmp_path / "run").fit()
    out = capsys.readouterr().out
    assert "classifier: re-initialised for 2 classes (the weights' classifier has (1000, 64)" in out


def test_reset_head_false_is_refused_from_timm_s_registry_before_any_download() -> None:
    """test_vit's pretrained weights have 1000 classes: known without touching the network."""
    with pytest.raises(
        ModelError, match=r"pretrained classifier of 'test_vit', but it has 1000 classes and the task 3"
    ):
        build_model(ModelConfig(name="test_vit", pretrained=True, reset_head=False), 3)
