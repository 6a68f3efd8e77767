"""Preprocessing under the user's control (data.mean/std/crop_pct/interpolation), and evaluating what was set.

The exports these keys produce are loaded through every documented form in test_export_forms.py; here:
the recipe checks, the old ``model.kwargs.pretrained_cfg_overlay`` workaround (which made ``ftsgd eval``
fail with "got multiple values for keyword argument"), and eval's bad-image advice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from ftsgd.cli.evaluate import eval_command
from ftsgd.errors import DataError, RecipeError
from ftsgd.infer.export import load_exported_model
from ftsgd.model.data_config import data_config_for
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import DataConfig
from ftsgd.train.trainer import Trainer

OVERLAY = "model.kwargs={img_size=32, pretrained_cfg_overlay={mean=[0.2, 0.3, 0.4], std=[0.4, 0.3, 0.2], crop_pct=1.0}}"


def problems_of(exc: pytest.ExceptionInfo[RecipeError]) -> str:
    return "\n".join(exc.value.problems)


def test_preprocessing_keys_are_checked() -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(
            None,
            [
                "data.mean=[0.5, 0.5]",
                "data.std=[0.5, 0.0, 0.5]",
                "data.crop_pct=1.5",
                'data.interpolation="bicubc"',
            ],
        )
    text = problems_of(exc)
    assert "data.mean: expected 3 numbers (one per RGB channel) or [] for the model's own" in text
    assert "data.std: every value must be > 0" in text
    assert "data.crop_pct: must be in (0, 1]" in text
    assert "data.interpolation: unknown value 'bicubc'; did you mean 'bicubic'?" in text


def test_unset_keys_keep_the_model_s_own_preprocessing() -> None:
    model = timm.create_model("test_resnet")
    own = data_config_for(model, DataConfig())
    assert own == {**timm.data.resolve_data_config(model=model), "input_size": (3, 160, 160)}
    custom = data_config_for(
        model,
        DataConfig(img_size=48, mean=[0.1, 0.2, 0.3], std=[1.0, 1.0, 1.0], crop_pct=0.5, interpolation="box"),
    )
    assert custom == {
        **own,
        "input_size": (3, 48, 48),
        "mean": (0.1, 0.2, 0.3),
        "std": (1.0, 1.0, 1.0),
        "crop_pct": 0.5,
        "interpolation": "box",
    }


@pytest.fixture(scope="module")
def overlay_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    """A run set up with the pretrained_cfg_overlay workaround and exported (no training needed)."""
    out = tmp_path_factory.mktemp("overlay") / "run"
    recipe = load_recipe(
        "sgd-freeze-embed",
        ['model.name="test_vit"', OVERLAY, f'data.root="{image_folder}"', "data.num_workers=0"],
    )
    trainer = Trainer(recipe, out, quiet=True)
    trainer.setup()
    trainer.export()
    return out, trainer


def test_pretrained_cfg_overlay_in_model_kwargs_evaluates(overlay_run, image_folder: Path) -> None:
    out, trainer = overlay_run
    assert tuple(trainer.prepared.data_config["mean"]) == (0.2, 0.3, 0.4)
    results = eval_command(out, image_folder, splits=["val"], num_workers=0)  # was: exit 2, TypeError
    expected = trainer.evaluate_split(trainer.eval_splits["val"])
    assert results["val"]["n"] == expected["n"]
    assert results["val"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert results["val"]["accuracy"] == expected["accuracy"]
    model, meta = load_exported_model(out)
    assert meta["mean"] == (0.2, 0.3, 0.4) and meta["crop_pct"] == 1.0
    # config.json's model_args holds model arguments only; the overlay's values are in its pretrained_cfg
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"] == {"img_size": 32, "num_classes": 3}
    assert config["pretrained_cfg"]["std"] == [0.4, 0.3, 0.2]
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_eval_bad_image_advice_names_eval_s_own_option(
    overlay_run, image_folder: Path, tmp_path: Path
) -> None:
    out, _ = overlay_run
    data = tmp_path / "data"
    for cls in ("circle", "square", "triangle"):
        (data / "val" / cls).mkdir(parents=True)
        source = next((image_folder / "val" / cls).iterdir())
        (data / "val" / cls / source.name).write_bytes(source.read_bytes())
    (data / "val" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as exc:
        eval_command(out, data, splits=["val"], num_workers=0)
    assert "--on-bad-image skip" in str(exc.value)
    assert "--set" not in str(exc.value) and "data.on_bad_image" not in str(exc.value)
    results = eval_command(out, data, splits=["val"], num_workers=0, on_bad_image="skip")
    assert results["val"]["n"] == 3
