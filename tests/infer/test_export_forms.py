"""Every kind of export loads exactly through each form the docs (docs/training.md) document.

The code blocks under "Using the exported weights in timm" are run as they are written (with
``RUN`` replaced by a real run directory), for exports at the default input size, with
``model.kwargs.img_size``, with ``data.img_size`` and with custom ``data.mean``/``std``/``crop_pct``/
``interpolation``. Each must give exactly the logits of ``ftsgd eval``'s model and a transform that
turns a real image into exactly the tensor ``ftsgd eval`` feeds it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ftsgd.data.images import load_image
from ftsgd.data.transforms import build_transform
from ftsgd.infer.export import export_data_config, load_exported_model
from ftsgd.recipe.load import load_recipe
from ftsgd.train.trainer import Trainer

TRAINING_DOC = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()

KINDS = {
    "default_size": ("test_vit", []),
    "model_kwargs_img_size": ("test_vit", ["model.kwargs={img_size=32}"]),
    "data_img_size": ("test_vit", ["data.img_size=48"]),
    "custom_preprocessing": (
        "test_resnet",
        [
            "data.img_size=40",
            "data.mean=[0.1, 0.2, 0.3]",
            "data.std=[0.3, 0.2, 0.1]",
            "data.crop_pct=1.0",
            'data.interpolation="bilinear"',
        ],
    ),
}


def readme_forms() -> list[str]:
    """The python blocks of the docs' section on loading exports in timm (docs/training.md)."""
    section = TRAINING_DOC.split("### Using the exported weights in timm", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the docs document two forms"
    return blocks


def write_export(kind: str, data: Path, out: Path) -> torch.nn.Module:
    """An export of ``kind`` written by the trainer's own export path; returns the trainer's (eval-mode) model."""
    arch, sets = KINDS[kind]
    recipe = load_recipe(
        "sgd-freeze-embed", [f'model.name="{arch}"', f'data.root="{data}"', "data.num_workers=0", *sets]
    )
    torch.manual_seed(0)
    trainer = Trainer(recipe, out, quiet=True)
    trainer.setup()
    trainer.export()
    return trainer.model.eval()


@pytest.fixture(scope="module", params=sorted(KINDS))
def export(request: pytest.FixtureRequest, image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    return request.param, out, write_export(request.param, image_folder, out)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    """A real, non-square image file (resizing and cropping both matter), read as ftsgd reads images."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    pixels = np.random.default_rng(3).integers(0, 256, size=(41, 57, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return load_image(path)


@pytest.mark.parametrize("form", [0, 1], ids=["local-dir", "config.json"])
def test_documented_form_is_exact(export, form: int, photo: Image.Image) -> None:
    kind, out, trained = export
    ours, meta = load_exported_model(out)  # what `ftsgd eval` evaluates
    ours_tf = build_transform(export_data_config(meta), "none", training=False)  # and how it preprocesses
    namespace: dict = {}
    exec(readme_forms()[form].replace("RUN", str(out)), namespace)
    model, transform = namespace["model"], namespace["transform"]

    torch.manual_seed(1)
    x = torch.randn(2, *meta["input_size"])
    with torch.no_grad():
        expected = ours(x)
        assert torch.equal(trained(x), expected)
        assert torch.equal(model(x), expected), kind
    assert torch.equal(transform(photo), ours_tf(photo)), kind
    assert tuple(transform(photo).shape) == tuple(meta["input_size"])


def test_custom_preprocessing_is_recorded_and_used(
    image_folder: Path, tmp_path: Path, photo: Image.Image
) -> None:
    out = tmp_path / "run"
    write_export("custom_preprocessing", image_folder, out)
    _, meta = load_exported_model(out)
    assert meta["input_size"] == (3, 40, 40)
    assert meta["mean"] == (0.1, 0.2, 0.3) and meta["std"] == (0.3, 0.2, 0.1)
    assert meta["crop_pct"] == 1.0 and meta["interpolation"] == "bilinear"
    pcfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 40, 40] and pcfg["mean"] == [0.1, 0.2, 0.3]
    assert pcfg["std"] == [0.3, 0.2, 0.1] and pcfg["crop_pct"] == 1.0 and pcfg["interpolation"] == "bilinear"
    ours = build_transform(export_data_config(meta), "none", training=False)(photo)
    # resize 57x41 -> 55x40 (crop_pct 1: no margin), centre crop 40x40, then (x - mean) / std per channel
    expected = torch.from_numpy(np.array(photo.resize((55, 40), Image.BILINEAR))).permute(2, 0, 1)
    expected = expected[:, :, 8:48].float() / 255
    expected = (expected - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.3, 0.2, 0.1])[
        :, None, None
    ]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_the_short_overlay_form_is_not_exact_for_other_sizes(image_folder: Path, tmp_path: Path) -> None:
    """Why the README documents only the two forms: the old short form builds the default input size."""
    out = tmp_path / "run"
    write_export("model_kwargs_img_size", image_folder, out)
    short = timm.create_model(
        "test_vit",
        pretrained=True,
        num_classes=3,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3),
    )
    assert timm.data.resolve_data_config(model=short)["input_size"] == (3, 160, 160)
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]
