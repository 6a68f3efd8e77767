"""``model.pretrained = true`` without a hub: fast, bounded failures and cached weights used offline.

This machine has no route to the hub, so the network's answers (a black hole, a cached file) are set up
by replacing the probe's own helpers in :mod:`ftsgd.hub`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from ftsgd.errors import ModelError
from ftsgd.model import hub
from ftsgd.model.build import build_model
from ftsgd.recipe.schema import ModelConfig


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, sd: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    for key, value in sd.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


def test_pretrained_offline_fails_fast_with_weights_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path: this machine cannot reach the hub (skipped where it can, to avoid a download)."""
    if hub._reachable("huggingface.co", 443, 3.0):
        pytest.skip("the hub is reachable here; the offline path cannot be exercised for real")
    monkeypatch.setattr(hub, "_cached_pretrained_file", lambda _cfg: None)
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(name="test_resnet", pretrained=True), num_classes=3)
    assert time.monotonic() - start < 15
    msg = str(info.value)
    assert "cannot download pretrained weights for 'test_resnet'" in msg and "--weights PATH" in msg


def test_pretrained_on_a_black_holed_network_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network that swallows packets (DNS/connect hanging) still fails within the probe timeout."""

    def hang(*_args: object, **_kwargs: object) -> None:
        time.sleep(3)  # far beyond the probe's timeout; then fail like a real connect timeout would
        raise TimeoutError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    monkeypatch.setattr(hub, "_PROBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(hub, "_cached_pretrained_file", lambda _cfg: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"unreachable.*--weights PATH"):
        build_model(ModelConfig(name="test_resnet", pretrained=True))
    assert time.monotonic() - start < 5


def test_pretrained_respects_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_cached_pretrained_file", lambda _cfg: None)
    monkeypatch.setattr(hub, "_reachable", lambda *_a: pytest.fail("must not probe the network"))
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE is set.*--weights PATH"):
        build_model(ModelConfig(name="test_resnet", pretrained=True))


def test_pretrained_uses_cached_weights_without_network(
    tmp_path: Path, source: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = tmp_path / "model.safetensors"
    save_file(source, cached)
    monkeypatch.setattr(hub, "_cached_pretrained_file", lambda _cfg: str(cached))
    monkeypatch.setattr(hub, "_reachable", lambda *_a: pytest.fail("must not probe the network"))
    model, report = build_model(ModelConfig(name="test_resnet", pretrained=True), num_classes=3)
    assert report is None and model.num_classes == 3
    _assert_same(model, source, skip=("fc.weight", "fc.bias"))


def test_local_weights_take_precedence_over_pretrained(
    tmp_path: Path, source: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file(source, tmp_path / "w.safetensors")
    monkeypatch.setattr(hub, "_reachable", lambda *_a: pytest.fail("must not probe the network"))
    cfg = ModelConfig(name="test_resnet", pretrained=True, weights=str(tmp_path / "w.safetensors"))
    model, report = build_model(cfg)
    assert report is not None and report.loaded == len(source)
    _assert_same(model, source)
