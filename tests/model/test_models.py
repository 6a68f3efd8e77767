"""Model building and safe weight loading (tiny timm models, never the hub)."""

from __future__ import annotations

import argparse
import gc
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from ftsgd.errors import ModelError, WeightsError
from ftsgd.model import build as models
from ftsgd.model.build import _MAX_LISTED, WeightsReport, build_model, load_weights
from ftsgd.model.data_config import model_data_config
from ftsgd.model.weights import MappedFile
from ftsgd.recipe.schema import ModelConfig


def _resnet(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)


def _vit(seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    kwargs.setdefault("img_size", 32)
    return timm.create_model("test_vit", pretrained=False, num_classes=4, **kwargs)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous().clone() for k, v in sd.items()}


def _assert_same(model: nn.Module, sd: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    for key, value in sd.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """Weights of a 1000-class test_resnet (the stand-in for an ImageNet checkpoint)."""
    return _contiguous(_resnet(seed=1).state_dict())


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin", ".pth.tar"])
def test_roundtrip_loads_every_tensor(tmp_path: Path, source: dict[str, torch.Tensor], suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source, path)
    else:
        torch.save(source, path)
    model = _resnet(seed=2)
    assert not torch.equal(model.state_dict()["conv1.0.weight"], source["conv1.0.weight"])
    report = load_weights(model, path)
    assert report == WeightsReport(str(path), len(source), (), (), ())
    _assert_same(model, source)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 7, "arch": "test_resnet", "optimizer": {"state": {}}},
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "step": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {f"model.{k}": v for k, v in sd.items()},  # Lightning
        # timm's train.py: plain weights + EMA copy + argparse args; the plain weights win
        lambda sd: {
            "state_dict_ema": {k: torch.zeros_like(v) for k, v in sd.items()},
            "state_dict": sd,
            "args": argparse.Namespace(lr=0.1, model="test_resnet"),
        },
    ],
    ids=["state_dict", "model", "model_state_dict", "module", "orig_mod", "lightning", "timm_train"],
)
def test_wrappers_and_prefixes_are_removed(tmp_path: Path, source: dict[str, torch.Tensor], wrap) -> None:
    path = tmp_path / "ck.pth"
    torch.save(wrap(source), path)
    model = _resnet(seed=2)
    report = load_weights(model, path)
    assert report.loaded == len(source) and not report.missing and not report.unexpected
    _assert_same(model, source)


def test_prefix_is_kept_when_the_model_really_has_it(tmp_path: Path) -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)

    torch.manual_seed(0)
    src = Wrapper()
    save_file(_contiguous(src.state_dict()), tmp_path / "w.safetensors")
    dst = Wrapper()
    assert load_weights(dst, tmp_path / "w.safetensors").loaded == 2
    _assert_same(dst, src.state_dict())


def test_imagenet_head_is_reinitialised_for_a_new_task(
    tmp_path: Path, source: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "in1k.safetensors"
    save_file(source, path)
    model = _resnet(num_classes=3, seed=2)
    fresh_head = model.fc.weight.detach().clone()
    report = load_weights(model, path)
    assert report.reinitialised == ("fc.weight", "fc.bias")
    assert report.missing == () and report.unexpected == ()
    assert report.loaded == len(source) - 2
    assert torch.equal(model.fc.weight, fresh_head)
    _assert_same(model, source, skip=report.reinitialised)

    # through build_model, as the CLI does it
    built, report2 = build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=3)
    assert report2 is not None and report2.reinitialised == ("fc.weight", "fc.bias")
    assert built.fc.out_features == 3
    _assert_same(built, source, skip=report2.reinitialised)


def test_missing_buffers_are_reported_not_refused(tmp_path: Path, source: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    partial["extra.weight"] = torch.zeros(2)
    save_file(partial, tmp_path / "p.safetensors")
    report = load_weights(_resnet(), tmp_path / "p.safetensors")
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert report.unexpected == ("extra.weight",)


def test_missing_parameters_are_refused(tmp_path: Path, source: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in source.items() if not k.startswith("layer4.")}
    save_file(partial, tmp_path / "p.safetensors")
    with pytest.raises(WeightsError) as info:
        load_weights(_resnet(), tmp_path / "p.safetensors")
    msg = str(info.value)
    assert "parameter(s) of test_resnet are not in" in msg
    assert "  - layer4.0.conv1.weight" in msg and "random values" in msg
    assert info.value.exit_code == 2


def test_shallower_variant_with_matching_shapes_is_refused(tmp_path: Path) -> None:
    # test_vit2 shares widths with test_vit, so every common key has the right shape; its missing
    # parameters would silently stay random without the check.
    path = tmp_path / "vit2.safetensors"
    save_file(_contiguous(timm.create_model("test_vit2", pretrained=False).state_dict()), path)
    with pytest.raises(WeightsError, match="not in"):
        load_weights(timm.create_model("test_vit", pretrained=False), path)


def test_vit2_file_into_test_vit_names_missing_parameters(tmp_path: Path) -> None:
    path = tmp_path / "vit2.safetensors"
    save_file(_contiguous(timm.create_model("test_vit2", pretrained=False, img_size=32).state_dict()), path)
    model = _vit()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(model, path)
    msg = str(info.value)
    # every shared key fits (same widths), but test_vit's class token and final norm are not in the file
    assert msg.startswith(f"3 parameter(s) of test_vit are not in {path}:\n")
    assert "  - cls_token\n  - norm.weight\n  - norm.bias\n" in msg
    assert "another architecture, depth or variant" in msg
    assert info.value.exit_code == 2
    _assert_same(model, fresh)  # refused before anything was copied


def test_many_missing_parameters_are_listed_with_a_count(
    tmp_path: Path, source: dict[str, torch.Tensor]
) -> None:
    partial = {k: v for k, v in source.items() if not k.startswith(("layer3.", "layer4."))}
    save_file(partial, tmp_path / "p.safetensors")
    with pytest.raises(WeightsError) as info:
        load_weights(_resnet(), tmp_path / "p.safetensors")
    msg = str(info.value)
    model = _resnet()
    expected = [n for n, _ in model.named_parameters() if n.startswith(("layer3.", "layer4."))]
    assert len(expected) > _MAX_LISTED
    assert msg.startswith(f"{len(expected)} parameter(s) of test_resnet are not in")
    assert msg.count("\n  - ") == _MAX_LISTED and f"... and {len(expected) - _MAX_LISTED} more" in msg
    assert "running_mean" not in msg  # buffers are never what makes a file unfit


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_loading_copies_in_place_and_streams(
    tmp_path: Path, source: dict[str, torch.Tensor], suffix: str
) -> None:
    path = tmp_path / f"w{suffix}"
    save_file(source, path) if suffix == ".safetensors" else torch.save({"state_dict": source}, path)
    model = _resnet()
    before = dict(model.named_parameters()) | dict(model.named_buffers())
    load_weights(model, path)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor is before[name]  # copied into the model's own tensors, not replaced
        assert torch.equal(tensor.detach(), source[name])
    gc.collect()
    assert not MappedFile(path).ranges  # nothing of the (memory-mapped) file outlives the load


def test_checkpoint_lacking_only_num_batches_tracked_loads_without_a_full_read(
    tmp_path: Path, source: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing buffers are reported, and they do not send the file through timm's (full-copy) filter."""
    partial = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    partial["extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": partial, "epoch": 90}, tmp_path / "ck.pth")
    monkeypatch.setattr(models, "_apply_timm_filter", lambda *_a: pytest.fail("needs no filter"))
    model = _resnet(seed=2)
    report = load_weights(model, tmp_path / "ck.pth")
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert report.unexpected == ("extra.weight",) and report.loaded == len(partial) - 1
    _assert_same(model, partial, skip=("extra.weight",))


def test_other_architecture_with_same_keys_lists_shapes(tmp_path: Path) -> None:
    path = tmp_path / "narrow.safetensors"
    save_file(_contiguous(_vit(embed_dim=32, num_heads=2).state_dict()), path)
    with pytest.raises(WeightsError) as info:
        load_weights(_vit(), path)
    msg = str(info.value)
    assert "cls_token: file (1, 1, 32) vs model (1, 1, 64)" in msg
    assert "more" in msg and "another architecture" in msg and str(path) in msg
    assert info.value.exit_code == 2


def test_unrelated_file_matches_nothing(tmp_path: Path, source: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file(source, path)
    with pytest.raises(WeightsError, match=rf"none of the {len(source)} tensors in .* match test_vit"):
        load_weights(_vit(), path)


def test_vit_position_embedding_is_resampled_for_a_new_img_size(tmp_path: Path) -> None:
    """timm's checkpoint_filter_fn is applied when it makes the file fit (pos_embed 4x4 -> 8x8)."""
    path = tmp_path / "vit32.safetensors"
    src = _contiguous(_vit(img_size=32).state_dict())
    save_file(src, path)
    model = _vit(img_size=64, seed=3)
    report = load_weights(model, path)
    assert report.loaded == len(src) and not report.missing
    assert src["pos_embed"].shape[1] == 1 + 2 * 2 and model.pos_embed.shape[1] == 1 + 4 * 4
    assert torch.equal(model.patch_embed.proj.weight, src["patch_embed.proj.weight"])


class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running_it(
    tmp_path: Path, source: dict[str, torch.Tensor], how: str
) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": source, "hook": _Payload(marker)}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch_zip")
    with pytest.raises(WeightsError) as info:
        load_weights(_resnet(), path)
    msg = str(info.value)
    assert "contains Python objects other than tensors" in msg
    assert "only loads tensors" in msg and "safetensors" in msg
    assert "system" in msg  # names what it refused to import
    assert not marker.exists()


def test_compiled_or_ddp_wrapper_loads_into_inner_model(
    tmp_path: Path, source: dict[str, torch.Tensor]
) -> None:
    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (no compile needed)
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    save_file(source, tmp_path / "w.safetensors")
    inner = _resnet(seed=4)
    assert load_weights(Compiled(inner), tmp_path / "w.safetensors").loaded == len(source)
    _assert_same(inner, source)


# ----------------------------------------------------------------------------------------- building


def test_build_model_kwargs_and_data_config() -> None:
    model, report = build_model(ModelConfig(name="test_vit", kwargs={"img_size": 32}), num_classes=5)
    assert report is None and model.num_classes == 5
    cfg = model_data_config(model)
    # timm's resolve_data_config alone would say (3, 160, 160), which this ViT cannot take
    assert cfg["input_size"] == (3, 32, 32)
    assert set(cfg) >= {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    assert model(torch.zeros(1, *cfg["input_size"])).shape == (1, 5)
    default, _ = build_model(ModelConfig(name="test_resnet"))
    assert default.num_classes == 1000


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="vit_base_patch16_244"))
    msg = str(info.value)
    assert msg.startswith("unknown model 'vit_base_patch16_244'; did you mean: vit_base_patch16_224")
    assert "timm.list_models('*vit*')" in msg
    with pytest.raises(ModelError, match="no such architecture"):
        build_model(ModelConfig(name="qqqqzzzz"))
    with pytest.raises(ModelError, match=r"no model given; pass --model"):
        build_model(ModelConfig(name=""))
    with pytest.raises(ModelError, match=r"Invalid pretrained tag \(bogus\)"):
        build_model(ModelConfig(name="test_resnet.bogus"))


def test_bad_kwargs_name_model_kwargs() -> None:
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="test_vit", kwargs={"img_size": 32, "dropout_rat": 0.1}))
    msg = str(info.value)
    assert "model.kwargs" in msg and "dropout_rat" in msg and "test_vit" in msg
    assert info.value.exit_code == 2
