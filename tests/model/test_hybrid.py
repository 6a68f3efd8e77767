"""Hybrid ViTs: ``embed`` freezes the conv stem (the layer that maps pixels to features), never a backbone.

One model per hybrid family timm has (a CNN, or a CNN's stem, inside the patch embedding: timm's
``HybridEmbed``), random init, exact parameter names as in test_freeze.py. Before the fix
``vit_small_r26_s32_224`` froze its whole ResNet backbone (89 tensors, 40.4%), ``vit_tiny_r_s16_p8_224``
its projection too (12.6%) and ``vitamin_small_224`` its MbConv stages (4.9%).
"""

from __future__ import annotations

import pytest
import timm
import torch

from ftsgd.inspect.inspection import EMBED_WARN_FRACTION, inspect_model
from ftsgd.model.embedding import find_embedding
from ftsgd.model.freeze import frozen_parameter_names
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import FreezeConfig

STEM = "patch_embed.backbone.stem"
R26D_STEM = [
    f"patch_embed.backbone.conv1.{p}"
    for p in ("0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight")
]

# (model, create kwargs, Embedding.modules, exact `embed` names); full depth where the old rule failed
HYBRIDS = [
    # ResNetV2 backbone (R26/R50+ViT): its stem, not its stages
    (
        "vit_small_r26_s32_224",
        {"img_size": 64},
        (STEM,),
        [f"{STEM}.conv.weight", f"{STEM}.norm.weight", f"{STEM}.norm.bias"],
    ),
    # ResNetV2 stem only, then an 8x8 projection (R+ViT-Ti): the stem, not the projection
    (
        "vit_tiny_r_s16_p8_224",
        {"img_size": 64},
        ("patch_embed.backbone",),
        [
            "patch_embed.backbone.conv.weight",
            "patch_embed.backbone.norm.weight",
            "patch_embed.backbone.norm.bias",
        ],
    ),
    # timm ResNet-D backbone (features_only): its deep stem and bn1, as for a plain resnet50d
    (
        "vit_small_resnet26d_224",
        {"img_size": 64, "depth": 1},
        ("patch_embed.backbone.conv1", "patch_embed.backbone.bn1"),
        [*R26D_STEM, "patch_embed.backbone.bn1.weight", "patch_embed.backbone.bn1.bias"],
    ),
    # MobileCLIP's ConvStem (three conv blocks, no projection): the ConvStem is the stem
    (
        "vit_base_mci_224",
        {"img_size": 64, "depth": 1},
        ("patch_embed.backbone",),
        [f"patch_embed.backbone.{i}.{p}" for i in (0, 1) for p in ("conv.weight", "bn.weight", "bn.bias")]
        + ["patch_embed.backbone.2.conv.weight", "patch_embed.backbone.2.conv.bias"],
    ),
    # ViTamin: MbConv stem + stages: the stem
    (
        "vitamin_small_224",
        {"img_size": 64},
        (STEM,),
        [f"{STEM}.{m}.{p}" for m in ("conv1", "norm1", "conv2") for p in ("weight", "bias")],
    ),
]


@pytest.mark.parametrize(("model_name", "kwargs", "modules", "embed"), HYBRIDS, ids=[h[0] for h in HYBRIDS])
def test_embed_freezes_only_the_conv_stem_of_a_hybrid(
    model_name: str, kwargs: dict, modules: tuple[str, ...], embed: list[str]
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    emb = find_embedding(model)
    assert emb.modules == modules
    assert emb.first_module == model.pretrained_cfg["first_conv"]  # timm agrees on where pixels enter
    frozen = frozen_parameter_names(model, FreezeConfig(policy="embed"), emb)
    assert frozen == embed
    assert "hybrid: the CNN stem of 'patch_embed.backbone'" in emb.method


def test_inspect_warns_when_the_embedding_is_more_than_a_few_percent() -> None:
    """test_vit's patch embedding is 16% of that tiny model: a case to check, so inspect warns."""
    recipe = load_recipe("sgd-freeze-embed", ['model.name="test_vit"'])
    report = inspect_model(recipe, 3, activations=False)
    assert report["embedding_fraction"] == pytest.approx(49_216 / 306_435)
    (warning,) = report["warnings"]
    assert (
        f"would freeze 16.1% of test_vit's parameters (49,216 of 306,435: patch_embed), more than {EMBED_WARN_FRACTION:.0%}"
        in warning
    )
    hybrid = load_recipe(
        "sgd-freeze-embed", ['model.name="vit_tiny_r_s16_p8_224"', "model.kwargs={img_size=64}"]
    )
    report = inspect_model(hybrid, 3, activations=False)
    assert report["embedding"] == ["patch_embed.backbone"] and report["warnings"] == []
