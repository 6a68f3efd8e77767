"""Per-layer learning rates: layer-wise decay (correct with frozen layers), embedding and head scales,
weight-decay grouping, step-in-backward and recipe validation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

from ftsgd.errors import RecipeError
from ftsgd.model.build import classifier_modules
from ftsgd.model.embedding import find_embedding
from ftsgd.model.freeze import apply_freeze, frozen_parameter_names
from ftsgd.model.layers import group_label, layer_groups
from ftsgd.model.optim import StepInBackward, build_optimizer, lr_per_layer, param_groups, set_lr
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import FreezeConfig, OptimConfig
from ftsgd.train.trainer import Trainer

DEPTH = 6  # test_vit's blocks
DECAY = 0.5


def train(recipe, out, **kwargs):
    return Trainer(recipe, out, **kwargs).fit()


def vit(policy: str = "none", patterns: tuple[str, ...] = ()) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    cfg = FreezeConfig(policy=policy, patterns=list(patterns))
    apply_freeze(model, frozen_parameter_names(model, cfg, find_embedding(model, (3, 32, 32))))
    return model


def scales_of(model: torch.nn.Module, groups: list[dict], lr: float | None = 1e-3) -> dict[str, float]:
    """Parameter name -> lr_scale of the group holding it; each parameter in at most one group.

    With ``lr``, the group's starting learning rate must be ``lr * lr_scale`` (ours carry it).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} in two groups"
            out[name] = g.get("lr_scale", 1.0)
            if lr is not None:
                assert g.get("lr", lr) == pytest.approx(lr * out[name])
    return out


def timm_layer_id(name: str) -> int:
    """test_vit's layer ids by timm's definition, by hand: stem 0, block i -> i + 1 (final norm with the
    last block), head (unmatched) d + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return DEPTH
    assert name.startswith("head.")
    return DEPTH + 1


def test_layer_decay_matches_a_hand_computation_with_a_frozen_embedding() -> None:
    model = vit("embed")
    cfg = OptimConfig(lr=1e-3, layer_decay=DECAY)
    got = scales_of(model, param_groups(model, cfg, embedding=("patch_embed",), classifier=("head",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("patch_embed.") for n in got), "a frozen parameter reached the optimizer"
    assert sorted(got) == sorted(trainable)
    # block i gets decay ** (d + 1 - layer_id), the head 1, cls/pos tokens decay ** (d + 1)
    expected = {n: DECAY ** (DEPTH + 1 - timm_layer_id(n)) for n in trainable}
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["blocks.0.attn.qkv.weight"] == pytest.approx(DECAY**6)
    assert got["blocks.5.mlp.fc2.bias"] == got["norm.weight"] == pytest.approx(DECAY)
    assert got["head.weight"] == 1.0 and got["cls_token"] == pytest.approx(DECAY**7)


def test_with_nothing_frozen_the_scales_are_timms() -> None:
    model = vit()
    ours = scales_of(model, param_groups(model, OptimConfig(layer_decay=DECAY)))
    theirs = scales_of(model, param_groups_layer_decay(model, weight_decay=0.0, layer_decay=DECAY), lr=None)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_frozen_top_and_middle_layers_are_not_counted() -> None:
    # timm issue 2691: timm counts frozen layers, so with the head and the last block frozen the top
    # trained block would get decay**2 instead of 1, and a frozen block in between costs one more factor
    model = vit("none", ("head.*", "blocks.5.*", "norm.*", "blocks.2.*"))
    got = scales_of(model, param_groups(model, OptimConfig(layer_decay=DECAY)))
    assert not any(n.startswith(("head.", "blocks.5.", "norm.", "blocks.2.")) for n in got)
    trained_layers = [0, 1, 2, 4, 5]  # stem, blocks 0, 1, 3, 4
    expected = {n: DECAY ** (len(trained_layers) - 1 - trained_layers.index(timm_layer_id(n))) for n in got}
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["blocks.4.attn.proj.weight"] == 1.0
    assert got["blocks.3.attn.proj.weight"] == DECAY and got["blocks.1.attn.proj.weight"] == DECAY**2
    timm_scales = scales_of(
        model, param_groups_layer_decay(model, weight_decay=0.0, layer_decay=DECAY), lr=None
    )
    assert timm_scales["blocks.4.attn.proj.weight"] == pytest.approx(DECAY**2)  # what we correct


def test_embedding_and_head_scales_multiply_the_layer_decay() -> None:
    model = vit()
    cfg = OptimConfig(lr=1e-3, layer_decay=DECAY, embed_lr_scale=0.2, head_lr_scale=10.0)
    got = scales_of(model, param_groups(model, cfg, embedding=("patch_embed",), classifier=("head",)))
    assert got["patch_embed.proj.weight"] == pytest.approx(0.2 * DECAY**7)
    assert got["pos_embed"] == pytest.approx(DECAY**7)  # same layer, not the embedding
    assert got["head.bias"] == pytest.approx(10.0)
    assert got["blocks.3.norm1.weight"] == pytest.approx(DECAY**3)
    plain = scales_of(model, param_groups(model, OptimConfig(embed_lr_scale=0.2), embedding=("patch_embed",)))
    assert {n for n, s in plain.items() if s != 1.0} == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert plain["patch_embed.proj.bias"] == pytest.approx(0.2)


def test_weight_decay_grouping_holds_with_layer_decay() -> None:
    model = vit("embed")
    groups = param_groups(model, OptimConfig(weight_decay=0.05, layer_decay=DECAY))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            skip = p.ndim <= 1 or n in ("pos_embed", "cls_token")
            assert g["weight_decay"] == (0.0 if skip else 0.05), n
    every = param_groups(model, OptimConfig(weight_decay=0.05, layer_decay=DECAY, decay_bias_and_norm=True))
    assert {g["weight_decay"] for g in every} == {0.05}
    assert scales_of(model, every) == pytest.approx(scales_of(model, groups))


def test_without_scales_the_groups_are_unchanged() -> None:
    model = vit("embed")
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    assert len(groups) == 2 and not any("lr_scale" in g or "lr" in g for g in groups)


def test_step_in_backward_keeps_each_parameters_scale() -> None:
    model = vit("embed")
    cfg = OptimConfig(name="sgd", lr=0.05, momentum=0.9, layer_decay=DECAY, head_lr_scale=4.0)
    inside = copy.deepcopy(model)
    normal_opt = build_optimizer(model, cfg, embedding=("patch_embed",), classifier=("head",))
    sib_cfg = OptimConfig(**{**cfg.__dict__, "step_in_backward": True})
    sib = build_optimizer(inside, sib_cfg, embedding=("patch_embed",), classifier=("head",))
    assert isinstance(sib, StepInBackward)
    expected = scales_of(
        model, param_groups(model, cfg, embedding=("patch_embed",), classifier=("head",)), lr=cfg.lr
    )
    per_param = {
        n: opt.param_groups[0].get("lr_scale", 1.0)
        for n, opt in zip(
            [n for n, p in inside.named_parameters() if p.requires_grad], sib.optimizers, strict=True
        )
    }
    assert per_param == pytest.approx(expected)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)
    ]
    for m, opt in ((model, normal_opt), (inside, sib)):
        m.train()
        for x, y in data:
            set_lr([opt], 0.05)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
    sib_lrs = sorted(g["lr"] for g in sib.param_groups)
    assert sib_lrs == pytest.approx(sorted(0.05 * expected[n] for n in expected))
    for (n, a), b in zip(model.named_parameters(), inside.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_a_scale_on_a_frozen_part_is_refused_with_both_keys() -> None:
    model = vit("none", ("patch_embed.*",))
    with pytest.raises(RecipeError) as err:
        param_groups(model, OptimConfig(embed_lr_scale=0.2), embedding=("patch_embed",), classifier=("head",))
    assert "optim.embed_lr_scale" in str(err.value) and "freeze.patterns" in str(err.value)
    head_frozen = vit("none", ("head.*",))
    with pytest.raises(RecipeError, match=r"optim\.head_lr_scale"):
        param_groups(head_frozen, OptimConfig(head_lr_scale=10.0), classifier=("head",))
    with pytest.raises(ValueError, match="module names"):
        param_groups(vit(), OptimConfig(embed_lr_scale=0.2))


def test_recipe_validation_reports_every_per_layer_lr_problem_at_once() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "sgd-freeze-embed",
            ["optim.layer_decay=1.5", "optim.embed_lr_scale=0.2", "optim.head_lr_scale=0"],
        )
    problems = err.value.problems
    assert any(p.startswith("optim.layer_decay: must be in [0, 1]") for p in problems)
    assert any(p.startswith("optim.head_lr_scale: must be > 0") for p in problems)
    frozen = next(p for p in problems if p.startswith("optim.embed_lr_scale"))
    assert "freeze.policy = 'embed'" in frozen
    ok = load_recipe("sgd", ["optim.layer_decay=0.75", "optim.embed_lr_scale=0.2", "optim.head_lr_scale=10"])
    assert (ok.optim.layer_decay, ok.optim.embed_lr_scale, ok.optim.head_lr_scale) == (0.75, 0.2, 10.0)
    for off in ("0", "1"):
        assert load_recipe("sgd", [f"optim.layer_decay={off}"]).optim.layer_decay == float(off)


def test_lr_per_layer_rows_for_inspect() -> None:
    model = vit("embed")
    emb = find_embedding(model, (3, 32, 32))
    cfg = OptimConfig(layer_decay=DECAY, head_lr_scale=10.0)
    rows = lr_per_layer(model, cfg, emb.modules, classifier_modules(model, emb.execution_order))
    assert [r.name for r in rows] == [
        "patch_embed",
        "cls_token + pos_embed",
        *[f"blocks.{i}" for i in range(5)],
        "blocks.5 + norm",
        "head",
    ]
    assert rows[0].lr_scales == () and rows[0].trainable_params == 0 and rows[0].params > 0
    assert [r.lr_scales for r in rows[1:]] == [(pytest.approx(DECAY ** (7 - i)),) for i in range(7)] + [
        (10.0,)
    ]


def test_group_labels_name_the_largest_whole_modules() -> None:
    convnext = timm.create_model("test_convnext", num_classes=3)
    names = [n for n, _ in convnext.named_parameters()]
    labels = [g.name for g in layer_groups(convnext, ("stem",), ("head.fc",))]
    assert labels[0] == "stem" and labels[-1] == "head.fc"
    assert "stages.1.downsample + stages.1.blocks.0" in labels and "head.norm" in labels
    assert group_label([n for n in names if n.startswith("stages.3.")], names) == "stages.3"
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    assert [g.name for g in layer_groups(plain, ("0",))] == ["0", "2"]


def test_training_applies_the_scales(image_folder: Path, tmp_path: Path) -> None:

    recipe = load_recipe(
        "sgd",
        [
            "model.name=test_vit",
            "model.kwargs={img_size=32}",
            f'data.root="{image_folder}"',
            "data.num_workers=0",
            "train.epochs=1",
            "train.batch_size=16",
            f"optim.layer_decay={DECAY}",
            "optim.embed_lr_scale=0.2",
            "optim.head_lr_scale=10",
        ],
    )
    train(recipe, tmp_path / "run", quiet=True)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    scales = sorted(g.get("lr_scale", 1.0) for g in saved)
    assert scales[0] == pytest.approx(0.2 * DECAY**7)  # the patch embedding, in the bottom layer
    assert scales[-1] == pytest.approx(10.0)  # the head
    assert all(g["lr"] == pytest.approx(1e-3 * g.get("lr_scale", 1.0)) for g in saved)
