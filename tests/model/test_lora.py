"""LoRA adapters (model.lora) on real tiny timm models: what trains, what is refused, what is exported.

Every model is a real timm ``test_vit`` / ``test_convnext`` with real PEFT adapters; every run is the real
Trainer on a tiny generated image folder.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.errors import RecipeError
from ftsgd.infer.export import ADAPTER_DIR
from ftsgd.model.lora import has_adapters
from ftsgd.model.prepare import prepare_model
from ftsgd.recipe.load import load_recipe
from ftsgd.run.checks import load_checked_recipe
from ftsgd.train.trainer import Trainer

pytestmark = [
    # find_spec, not importorskip: importing peft (and the transformers it loads) costs ~5 s of collection
    pytest.mark.skipif(
        importlib.util.find_spec("peft") is None, reason="needs peft: pip install 'ftsgd[lora]'"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]

VIT = ['model.name="test_vit"', "model.kwargs={img_size=32}", "data.img_size=32"]
CONVNEXT = ['model.name="test_convnext"', "data.img_size=32"]
FAST = ["data.num_workers=0", 'data.augment="flip"', "train.batch_size=8", "train.epochs=2"]
runner = CliRunner()


def _lora(recipe: str = "lora", *sets: str) -> object:
    return load_recipe(recipe, [*VIT, *sets])


# ------------------------------------------------------------------------------------------ what trains


def test_vit_trains_the_adapters_on_qkv_proj_fc1_fc2_and_the_whole_classifier() -> None:
    """test_vit: 6 blocks of width 64, MLP 192; rank 16 on qkv (64->192), proj (64->64), fc1, fc2."""
    prepared = prepare_model(_lora("lora-sgd-freeze-embed"), 3)
    per_block = 16 * ((64 + 192) + (64 + 64) + (64 + 192) + (192 + 64))
    assert prepared.trainable_params == 6 * per_block + (64 * 3 + 3) == 86_211
    assert len(prepared.lora_targets) == 24 and "patch_embed.proj" not in prepared.lora_targets
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(".lora_" in n for n in trainable - {"head.weight", "head.bias"})
    assert prepared.total_params == 300_291 + 6 * per_block  # the plain model + the adapters
    assert prepared.frozen_params == prepared.total_params - prepared.trainable_params
    assert prepared.freeze_report()["lora_targets"][:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]


def test_convnext_adapts_its_mlp_linears_and_rank_and_targets_change_the_count() -> None:
    """test_convnext: rank 16 on every block's MLP fc1 and fc2 (counted from the plain model's layers)."""
    recipe = load_recipe("lora", CONVNEXT)
    prepared = prepare_model(recipe, 3)
    base = timm.create_model("test_convnext", num_classes=3)
    fcs = [(n, m) for n, m in base.named_modules() if n.endswith(("mlp.fc1", "mlp.fc2"))]
    expected = sum(16 * (m.in_features + m.out_features) for _, m in fcs)
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("head.fc."))
    assert prepared.trainable_params == expected + head == 65_475
    assert list(prepared.lora_targets) == [n for n, _ in fcs]
    narrow = prepare_model(load_recipe("lora", [*CONVNEXT, "lora.r=2", 'lora.targets=["stages.3.*.fc2"]']), 3)
    fc2 = [m for n, m in fcs if n.startswith("stages.3.") and n.endswith("fc2")]
    assert narrow.trainable_params == sum(2 * (m.in_features + m.out_features) for m in fc2) + head


def test_lp_then_lora_stages_train_the_head_then_the_adapters(image_folder: Path, tmp_path: Path) -> None:
    recipe = load_checked_recipe(
        "lora-sgd-freeze-embed",
        [
            *VIT,
            *FAST[:3],
            f'data.root="{image_folder}"',
            'stage=[{name="probe", freeze={policy="head"}, train={epochs=1}}, {name="lora", train={epochs=1}}]',
        ],
    )
    summary = Trainer(recipe, tmp_path / "run", quiet=True).fit()
    assert summary is not None and summary["epochs"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    b = ckpt["model"]["blocks.0.attn.qkv.lora_B.default.weight"]
    assert b.abs().sum() > 0  # zero at the start; the probe left it alone, the LoRA stage trained it


# ------------------------------------------------------------------------------------------ refused


def test_bad_values_are_refused_each_naming_its_key() -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe("lora", ["lora.r=0", "lora.alpha=0", "lora.dropout=1.0", "train.shard=true"])
    problems = exc.value.problems
    assert any(p.startswith("lora.r: the adapters' rank must be >= 1") for p in problems)
    assert any(p.startswith("lora.alpha: must be > 0") for p in problems)
    assert any(p.startswith("lora.dropout: must be in [0, 1)") for p in problems)
    assert any(p.startswith("lora.enabled: cannot be combined with train.shard") for p in problems)


def test_a_linear_probe_as_the_last_stage_would_never_train_the_adapters() -> None:
    with pytest.raises(RecipeError, match=r'freeze\.policy: "head" freezes .* LoRA adapters'):
        load_recipe("lora", ['freeze.policy="head"'])
    with pytest.raises(RecipeError, match=r"stage\.2\.freeze\.policy: \"head\""):
        load_recipe("lora", ['stage=[{freeze={policy="none"}}, {freeze={policy="head"}}]'])
    load_recipe("lora", ['stage=[{freeze={policy="head"}}, {freeze={policy="embed"}}]'])  # LP, then LoRA


def test_targets_matching_nothing_list_the_candidates() -> None:
    with pytest.raises(RecipeError) as exc:
        prepare_model(_lora("lora", 'lora.targets=["qkvv", "fc1"]'), 3)
    (line,) = exc.value.problems
    assert line.startswith("lora.targets: 'qkvv' matches no layer of test_vit LoRA can adapt")
    assert "'qkv'" in line and '"proj"' in line


def test_a_freeze_policy_that_freezes_adapters_is_refused() -> None:
    recipe = _lora("lora-sgd-freeze-embed", 'lora.targets=["patch_embed.proj", "qkv"]')
    with pytest.raises(
        RecipeError, match=r"freeze\.policy: 'embed' .* freezes the LoRA adapters of patch_embed\.proj"
    ):
        prepare_model(recipe, 3)
    assert prepare_model(_lora("lora", 'lora.targets=["patch_embed.proj", "qkv"]'), 3).trainable_params


def test_cli_exits_2_before_training(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [
        "train",
        "--data",
        str(image_folder),
        "--model",
        "test_vit",
        "--set",
        "model.kwargs={img_size=32}",
    ]
    out = tmp_path / "run"
    result = runner.invoke(
        app, [*base, "--recipe", "lora", "--out", str(out), "--set", 'lora.targets=["nope"]']
    )
    assert result.exit_code == 2, result.output
    assert "lora.targets: 'nope' matches no layer" in result.stderr and not (out / "checkpoint.pt").exists()
    monkeypatch.setitem(sys.modules, "peft", None)  # how Python marks a package as not importable
    result = runner.invoke(app, [*base, "--recipe", "lora", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "pip install 'ftsgd[lora]'" in result.stderr.replace("\n", " ")


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    recipe = load_checked_recipe(
        "lora", [*VIT, *FAST, f'data.root="{image_folder}"', "optim.lr=0.01", "lora.dropout=0.0"]
    )
    out = tmp_path_factory.mktemp("lora") / "run"
    Trainer(recipe, out, quiet=True).fit()
    return out


def _trained(run: Path) -> torch.nn.Module:
    """The run's adapted model as it trained, from its last checkpoint (epoch 2 is exported if best)."""
    recipe = load_recipe(str(run / "recipe.toml"))
    prepared = prepare_model(recipe, 3, from_checkpoint=True)
    prepared.model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    return prepared.model.eval()


def test_merged_export_is_plain_timm_loaded_strict_with_the_same_logits(lora_run: Path) -> None:
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["best_epoch"] == 2 or pytest.skip("the export is of epoch 1; the checkpoint of epoch 2")
    tensors = load_file(lora_run / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in tensors)
    fresh = timm.create_model("test_vit", num_classes=3, img_size=32)
    fresh.load_state_dict(tensors, strict=True)
    trained = _trained(lora_run)
    assert has_adapters(trained)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained(x), rtol=1e-5, atol=1e-5)
    local = timm.create_model(f"local-dir:{lora_run}", pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(local.eval()(x), trained(x), rtol=1e-5, atol=1e-5)


def test_adapters_are_written_in_peft_format_and_load_with_peft(lora_run: Path) -> None:
    from peft import PeftModel

    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["best_epoch"] == 2 or pytest.skip("the export is of epoch 1; the checkpoint of epoch 2")
    folder = lora_run / ADAPTER_DIR
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (16, 16.0, ["head"])
    trained = _trained(lora_run)
    base = timm.create_model("test_vit", num_classes=3, img_size=32)
    state = {k.replace(".base_layer.", "."): v for k, v in trained.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)  # the starting weights (the run started from a random init)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), trained(x), rtol=1e-5, atol=1e-5)


def test_inspect_counts_the_adapters_and_estimates_their_memory() -> None:
    result = runner.invoke(
        app,
        [
            "inspect",
            "test_vit",
            "--recipe",
            "lora",
            "--set",
            "model.kwargs={img_size=32}",
            "--num-classes",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["trainable_params"] == 86_211 and len(data["lora_targets"]) == 24
    memory = data["memory"]
    # AdamW on 86,211 parameters: weight 4 + gradient 4 + moments 8 bytes each; the rest is weights only
    assert memory["optimizer_state"] == 8 * 86_211 and memory["gradients"] == 4 * 86_211
    assert memory["total"] < memory["adamw_total"]
    compared = memory["state_compared"]  # the plain model: 300,291 parameters, 49,216 of them the embedding
    assert compared["this_recipe"] == memory["weights"] + 16 * 86_211 - 4 * 86_211
    assert compared["adamw"] == 16 * 300_291 and compared["sgd_freeze_embed"] == 12 * 300_291 - 8 * 49_216


@pytest.mark.parametrize(
    ("name", "sets"),
    [("test_convnext", ['model.name="test_convnext"']), ("test_resnet", ['model.name="test_resnet"'])],
)
def test_merged_weights_of_linear_and_conv_adapters_give_the_adapted_logits(
    name: str, sets: list[str]
) -> None:
    """ConvNeXt's MLP linears, ResNet's convolutions: B set away from its zero start, then merged."""
    from ftsgd.model.lora import merged_state_dict

    torch.manual_seed(0)
    model = prepare_model(load_recipe("lora", [*sets, "data.img_size=32"]), 3).model.eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".lora_B." in key:
                param.normal_(0, 0.05)
    merged_state = merged_state_dict(model)
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    changed = [k for k, v in merged_state.items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # only the adapted layers' weights
    fresh = timm.create_model(name, num_classes=3).eval()
    fresh.load_state_dict(merged_state, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted, merged = model(x), fresh(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_the_gradient_diagnostic_runs_with_a_lora_recipe(image_folder: Path) -> None:
    """``inspect --data``: the backbone's per-layer gradient norms, as for every recipe."""
    result = runner.invoke(
        app,
        [
            "inspect",
            "test_vit",
            "--recipe",
            "lora-sgd-freeze-embed",
            "--set",
            "model.kwargs={img_size=32}",
            "--data",
            str(image_folder),
            "--batches",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["trainable_params"] == 86_211
    assert data["gradient_diagnostic"]["groups"][0]["kind"] == "embedding"
