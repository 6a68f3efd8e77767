"""safetensors export: metadata, timm-format config.json, and loading the result with plain timm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftsgd import __version__
from ftsgd.errors import WeightsError
from ftsgd.infer.export import export_model, load_exported_model, read_export
from ftsgd.model.data_config import model_data_config

CLASSES = ["cat", "dog", "sea, lion", "café"]
"""Order matters, commas and non-ASCII must survive."""

CASES = {
    "test_vit": {"img_size": 32},
    "test_resnet": {},
}


def _trained(arch: str, kwargs: dict, seed: int = 0) -> nn.Module:
    """A model whose every tensor (head and BatchNorm statistics included) differs from a fresh one."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(CLASSES), **kwargs)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
    return model.eval()


def _export(model: nn.Module, out: Path, arch: str, kwargs: dict, **extra: str) -> dict:
    data_config = model_data_config(model)
    export_model(
        model,
        out,
        architecture=arch,
        class_names=CLASSES,
        data_config=data_config,
        recipe_name="kumar_sgd_freeze_embed",
        model_kwargs=kwargs,
        extra=extra or None,
    )
    return data_config


def _input(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(2, *model_data_config(model)["input_size"])


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch = request.param
    kwargs = CASES[arch]
    model = _trained(arch, kwargs)
    out = tmp_path_factory.mktemp(arch) / "run"
    data_config = _export(model, out, arch, kwargs, run_id="r-42")
    return arch, kwargs, model, out, data_config


def test_metadata_roundtrip(exported) -> None:
    arch, kwargs, model, out, data_config = exported
    tensors, meta = read_export(out / "model.safetensors")
    assert set(tensors) == set(model.state_dict())  # the timm model's own keys, no wrapper prefixes
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[key], value), key
    assert meta["format"] == "pt"
    assert meta["architecture"] == arch
    assert meta["num_classes"] == len(CLASSES)
    assert meta["class_names"] == CLASSES
    assert meta["input_size"] == tuple(data_config["input_size"])
    assert meta["mean"] == tuple(data_config["mean"]) and meta["std"] == tuple(data_config["std"])
    assert meta["interpolation"] == data_config["interpolation"]
    assert meta["crop_pct"] == pytest.approx(data_config["crop_pct"])
    assert meta["crop_mode"] == data_config["crop_mode"]
    assert meta["model_kwargs"] == kwargs
    assert meta["recipe"] == "kumar_sgd_freeze_embed"
    assert meta["ftsgd_version"] == __version__
    assert meta["run_id"] == "r-42"


def test_config_json_in_timm_hub_format(exported) -> None:
    arch, kwargs, model, out, data_config = exported
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architecture"] == arch
    assert config["num_classes"] == len(CLASSES)
    assert config["num_features"] == model.num_features
    assert config["label_names"] == CLASSES
    assert config["model_args"] == {**kwargs, "num_classes": len(CLASSES)}
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == list(data_config["input_size"])
    assert pcfg["mean"] == list(data_config["mean"]) and pcfg["std"] == list(data_config["std"])
    assert pcfg["interpolation"] == data_config["interpolation"]
    assert pcfg["crop_pct"] == data_config["crop_pct"] and pcfg["crop_mode"] == data_config["crop_mode"]
    assert pcfg["num_classes"] == len(CLASSES)
    assert pcfg["classifier"] == model.pretrained_cfg["classifier"]
    assert pcfg["first_conv"] == model.pretrained_cfg["first_conv"]
    # nothing may point back at the source weights on the hub
    assert not {"hf_hub_id", "url", "file", "tag", "label_names"} & set(pcfg)


def test_timm_loads_export_with_identical_logits(exported) -> None:
    arch, kwargs, model, out, _ = exported
    n = len(CLASSES)
    # num_classes has to be in the overlay as well: otherwise timm compares the model's num_classes
    # with the architecture's default config (1000), drops the classifier and re-initialises it.
    rebuilt = timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=n),
        num_classes=n,
        **kwargs,
    ).eval()
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_timm_local_dir_uses_config_json(exported) -> None:
    _arch, _kwargs, model, out, _ = exported
    try:
        from timm.models._hub import load_model_config_from_path  # noqa: F401
    except ImportError:
        pytest.skip("this timm has no local-dir: model source")
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert rebuilt.num_classes == len(CLASSES)
    assert rebuilt.pretrained_cfg["label_names"] == CLASSES
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("where", ["dir", "file"])
def test_load_exported_model(exported, where: str) -> None:
    arch, _kwargs, model, out, data_config = exported
    rebuilt, meta = load_exported_model(out if where == "dir" else out / "model.safetensors")
    assert not rebuilt.training
    assert meta["class_names"] == CLASSES and meta["architecture"] == arch
    assert model_data_config(rebuilt) == {**data_config, "input_size": tuple(data_config["input_size"])}
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.slow
def test_export_unwraps_compiled_and_copes_with_channels_last(tmp_path: Path) -> None:
    model = _trained("test_resnet", {}).to(memory_format=torch.channels_last)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    _export(compiled, tmp_path, "test_resnet", {})
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    assert all(t.is_contiguous() for t in tensors.values())


def test_export_copes_with_shared_storage(tmp_path: Path) -> None:
    model = _trained("test_resnet", {})
    model.register_buffer("fc_view", model.fc.weight.detach()[:2])  # shares storage with fc.weight
    _export(model, tmp_path, "test_resnet", {})
    tensors, _ = read_export(tmp_path)
    assert torch.equal(tensors["fc_view"], model.fc.weight[:2])


def test_export_replaces_previous_export(tmp_path: Path) -> None:
    first, second = _trained("test_resnet", {}, seed=0), _trained("test_resnet", {}, seed=1)
    _export(first, tmp_path, "test_resnet", {})
    _export(second, tmp_path, "test_resnet", {})
    tensors, _ = read_export(tmp_path)
    assert torch.equal(tensors["fc.weight"], second.fc.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_export_rejects_programming_errors(tmp_path: Path) -> None:
    model = _trained("test_resnet", {})
    common = dict(architecture="test_resnet", data_config=model_data_config(model), recipe_name="r")
    with pytest.raises(ValueError, match="3 class names given for a model with 4 outputs"):
        export_model(model, tmp_path, class_names=CLASSES[:3], **common)
    with pytest.raises(ValueError, match="may not override standard keys: architecture"):
        export_model(model, tmp_path, class_names=CLASSES, extra={"architecture": "x"}, **common)
    assert not (tmp_path / "model.safetensors").exists()


def test_read_export_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no exported model at"):
        read_export(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(WeightsError, match=r"not an ftsgd export.*--weights PATH"):
        read_export(tmp_path / "plain.safetensors")
    data = (tmp_path / "plain.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or not a valid safetensors file"):
        load_exported_model(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("interpolation", "evil", "interpolation 'evil' is not one of nearest, bilinear"),
        ("architecture", "hf-hub:someone/some-model", "names a source, not a timm architecture"),
        ("crop_pct", "7", "crop_pct 7 is not a number in (0, 1]"),
        ("input_size", "[3, -1, 32]", "input_size (3, -1, 32) is not [channels, height, width]"),
    ],
)
def test_hand_edited_metadata_is_refused_by_key_without_the_network(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    """An export is rebuilt from its own metadata: a bad value is exit 2 naming it, a hub name never fetched."""
    import time

    from safetensors import safe_open
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from ftsgd.cli.app import app

    _export(_trained("test_vit", CASES["test_vit"]), tmp_path, "test_vit", CASES["test_vit"])
    weights = tmp_path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        metadata = dict(fh.metadata())
    save_file(load_file(weights), str(weights), metadata={**metadata, key: value})
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "one.png")
    start = time.monotonic()
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path / "one.png")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert time.monotonic() - start < 10
