"""The gradient diagnostic: its numbers against a hand computation, its groups on every architecture,
its recommendation against the paper's numbers, and ``ftsgd inspect --data`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.inspect.diagnose import (
    FREEZE_RATIO,
    diagnose_from_recipe,
    gradient_diagnostic,
    recommend,
    text_bars,
)
from ftsgd.model.build import classifier_modules
from ftsgd.model.embedding import find_embedding
from ftsgd.recipe.load import load_recipe

runner = CliRunner()
TINY_VIT = ["--set", "model.kwargs={img_size=32}", "--set", "train.batch_size=4"]


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    return timm.create_model(name, num_classes=3, **kwargs)


def random_batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def by_hand(model: torch.nn.Module, batches, groups: dict[str, list[str]]) -> dict[str, float]:
    """Mean over batches of sqrt(sum of squared per-parameter gradient norms), straight from autograd."""
    named = dict(model.named_parameters())
    model.train()
    sums = dict.fromkeys(groups, 0.0)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))
        for group, names in groups.items():
            sums[group] += math.sqrt(sum(float(grads[n].double().norm()) ** 2 for n in names))
    return {group: total / len(batches) for group, total in sums.items()}


def vit_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """test_vit's groups written out by hand: patch_embed | tokens | each block (+ final norm) | head."""
    names = [n for n, _ in model.named_parameters()]
    groups = {
        "patch_embed": [n for n in names if n.startswith("patch_embed.")],
        "cls_token + pos_embed": ["cls_token", "pos_embed"],
    }
    for i in range(6):
        label = "blocks.5 + norm" if i == 5 else f"blocks.{i}"
        groups[label] = [
            n for n in names if n.startswith(f"blocks.{i}.") or (i == 5 and n.startswith("norm."))
        ]
    groups["head"] = ["head.weight", "head.bias"]
    assert sorted(n for members in groups.values() for n in members) == sorted(names)
    return groups


def test_norms_equal_a_direct_per_parameter_computation() -> None:
    model = tiny("test_vit")
    data = random_batches(3)
    emb = find_embedding(model, (3, 32, 32))
    result = gradient_diagnostic(model, data, emb.modules, classifier_modules(model, emb.execution_order))
    expected = by_hand(tiny("test_vit"), data, vit_groups(model))

    assert [g.name for g in result.groups] == list(expected)
    assert [g.kind for g in result.groups] == ["embedding"] + ["middle"] * 7 + ["head"]
    for g in result.groups:
        assert g.norm == pytest.approx(expected[g.name], rel=1e-6), g.name
        assert g.norm == pytest.approx(sum(g.batch_norms) / 3, rel=1e-12)
    middle = sorted(g.norm for g in result.groups if g.kind == "middle")
    assert result.median_middle_norm == pytest.approx(middle[3], rel=1e-12)
    assert result.ratio == pytest.approx(expected["patch_embed"] / middle[3], rel=1e-6)
    assert (result.batches, result.images, result.num_classes) == (3, 12, 3)
    assert result.groups[0].params == sum(p.numel() for p in model.patch_embed.parameters())


def test_batchnorm_model_matches_by_hand_and_is_left_as_found() -> None:
    model = tiny("test_resnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_batches(2)
    emb = find_embedding(model, (3, 32, 32))
    result = gradient_diagnostic(model, data, emb.modules, classifier_modules(model, emb.execution_order))

    names = [n for n, _ in model.named_parameters()]
    groups = {"conv1 + bn1": [n for n in names if n.startswith(("conv1.", "bn1."))]}
    groups |= {f"layer{i}": [n for n in names if n.startswith(f"layer{i}.")] for i in range(1, 5)}
    groups["fc"] = ["fc.weight", "fc.bias"]
    expected = by_hand(tiny("test_resnet"), data, groups)
    assert {g.name: g.norm for g in result.groups} == pytest.approx(expected, rel=1e-6)
    # no update, BatchNorm statistics restored, eval mode kept, no gradient left behind
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_micro_batches_give_the_batch_gradient() -> None:
    emb_model = tiny("test_vit")
    emb = find_embedding(emb_model, (3, 32, 32))
    data = random_batches(2, size=6)
    whole = gradient_diagnostic(tiny("test_vit"), data, emb.modules, ("head",))
    micro = gradient_diagnostic(tiny("test_vit"), data, emb.modules, ("head",), micro_batch_size=2)
    for a, b in zip(whole.groups, micro.groups, strict=True):
        assert b.norm == pytest.approx(a.norm, rel=1e-5), a.name


def test_frozen_parameters_are_not_measured_and_no_embedding_is_an_error() -> None:
    model = tiny("test_vit")
    model.pos_embed.requires_grad_(False)
    result = gradient_diagnostic(model, random_batches(1), ("patch_embed",), ("head",))
    assert result.not_measured == ("pos_embed",)
    assert next(g for g in result.groups if g.name == "cls_token + pos_embed").params == 64
    model.patch_embed.requires_grad_(False)
    with pytest.raises(ValueError, match="embedding"):
        gradient_diagnostic(model, random_batches(1), ("patch_embed",), ("head",))
    with pytest.raises(ValueError, match="no batches"):
        gradient_diagnostic(tiny("test_vit"), [], ("patch_embed",), ("head",))


def test_recommendation_follows_the_papers_numbers() -> None:
    # CLIP ViT-B/16 on Living-17: embedding ~7.8, middle layers <= 2.5 -> freeze
    ratio, freeze, reason = recommend(7.8, [2.5, 2.0, 1.8, 1.5])
    assert freeze is True and ratio == pytest.approx(7.8 / 1.9)
    assert "freeze.policy" in reason and f"{FREEZE_RATIO:g}x" in reason
    # ConvNeXt-B: ~3.4 vs <= 1.1 -> freeze
    assert recommend(3.4, [1.1, 1.0, 0.8])[1] is True
    # BiT ResNet-50: ~6 vs middle layers up to ~22 -> no gap
    ratio, freeze, reason = recommend(6.0, [22.0, 12.0, 7.0, 5.0])
    assert freeze is False and ratio == pytest.approx(6 / 9.5) and "not needed" in reason
    assert recommend(FREEZE_RATIO, [1.0])[1] is True and recommend(FREEZE_RATIO - 0.01, [1.0])[1] is False
    assert recommend(0.0, [0.0, 0.0])[1] is None
    assert recommend(1.0, [0.0])[:2] == (math.inf, True)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_convnext", "test_efficientnet"])
def test_every_architecture_from_a_recipe(name: str, image_folder: Path) -> None:
    kwargs = "model.kwargs={img_size=32}" if name == "test_vit" else "model.kwargs={}"
    recipe = load_recipe("sgd", [f"model.name={name}", kwargs, "data.img_size=32", "train.batch_size=4"])
    result = diagnose_from_recipe(recipe, image_folder, batches=2)

    model = tiny(name)
    emb = find_embedding(model, (3, 32, 32))
    assert result.groups[0].kind == "embedding" and result.groups[0].name == " + ".join(emb.modules)
    assert result.groups[-1].kind == "head"
    assert result.groups[-1].name == " + ".join(classifier_modules(model, emb.execution_order))
    assert sum(g.kind == "middle" for g in result.groups) >= 4
    assert (result.batches, result.images, result.num_classes) == (2, 8, 3)
    assert all(g.norm > 0 and math.isfinite(g.norm) for g in result.groups if g.kind != "middle")
    assert sum(g.params for g in result.groups) == sum(p.numel() for p in model.parameters())
    assert result.freeze_embedding is (result.ratio >= FREEZE_RATIO)


def test_fewer_batches_than_asked_uses_the_whole_split(image_folder: Path) -> None:
    recipe = load_recipe("sgd", ["model.name=test_vit", "model.kwargs={img_size=32}", "train.batch_size=16"])
    train_images = sum(1 for p in (image_folder / "train").rglob("*.png"))
    result = diagnose_from_recipe(recipe, image_folder, batches=100)
    assert result.images == train_images and result.batches == math.ceil(train_images / 16)


def test_text_bars_scale_to_the_largest_norm() -> None:
    result = gradient_diagnostic(tiny("test_vit"), random_batches(1), ("patch_embed",), ("head",))
    bars = text_bars(result, width=20)
    top = max(range(len(bars)), key=lambda i: result.groups[i].norm)
    assert bars[top] == "#" * 20
    assert all(
        len(b) == round(20 * g.norm / result.groups[top].norm)
        for b, g in zip(bars, result.groups, strict=True)
    )


def test_inspect_data_json_and_png(image_folder: Path, tmp_path: Path) -> None:
    png = tmp_path / "plots"
    args = [
        "inspect",
        "test_vit",
        *TINY_VIT,
        "--data",
        str(image_folder),
        "--batches",
        "2",
        "--png",
        str(png),
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    diag = report["gradient_diagnostic"]
    assert diag["groups"][0]["name"] == "patch_embed" and diag["batches"] == 2 and diag["images"] == 8
    assert diag["num_classes"] == 3 and report["num_classes"] == 3
    assert diag["freeze_embedding"] in (True, False) and diag["reason"]
    assert "no --weights" in result.stderr
    assert (png / "gradient_diagnostic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_inspect_data_plain_and_terminal_output(image_folder: Path) -> None:
    args = ["inspect", "test_vit", *TINY_VIT, "--data", str(image_folder), "--batches", "1"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.stderr
    assert "Gradient norm per layer group" in plain.stdout and "recommendation:" in plain.stdout
    assert "#" in plain.stdout and "\x1b[" not in plain.stdout
    rich = runner.invoke(app, args, env={"FTSGD_FORCE_TTY": "1"})
    assert rich.exit_code == 0, rich.stderr
    assert "blocks.5 + norm" in rich.stdout and "recommendation:" in rich.stdout


def test_inspect_diagnostic_usage_errors_exit_2_before_any_work(image_folder: Path, tmp_path: Path) -> None:
    cases = [
        (["--png", str(tmp_path / "plots")], "add --data"),
        (["--batches", "3"], "add --data"),
        (["--data", str(image_folder), "--png", str(tmp_path / "x.png")], "--png takes a folder"),
        (["--data", str(image_folder), "--png", str(Path(__file__))], "exists and is not a folder"),
        (["--data", str(image_folder), "--num-classes", "5"], "does not match the 3 classes"),
        (["--data", str(tmp_path / "nope")], "does not exist"),
        (["--data", str(image_folder), "--batches", "0"], "--batches"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["inspect", "test_vit", *TINY_VIT, *extra])
        assert result.exit_code == 2, (extra, result.stdout, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
    assert not list(tmp_path.iterdir())


def test_a_batch_count_no_run_can_use_is_a_usage_error(image_folder: Path) -> None:
    result = runner.invoke(
        app, ["inspect", "test_vit", *TINY_VIT, "--data", str(image_folder), "--batches", "1" + "0" * 23]
    )
    assert result.exit_code == 2 and "--batches" in result.output and "Traceback" not in result.output
