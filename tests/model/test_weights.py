"""Reading weight files: every format, nothing executed, truncated and odd files refused, pages released."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ftsgd.errors import WeightsError
from ftsgd.model.build import build_model
from ftsgd.model.weights import MappedFile, read_state_dict
from ftsgd.recipe.schema import ModelConfig


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="releases pages with madvise (Linux)")
def test_mapped_file_pages_are_handed_back_after_copying(tmp_path: Path) -> None:
    def rss_file() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("RssFile:")).split()[1]) * 1024

    big = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    torch.save({"w": big, "small": torch.ones(3)}, tmp_path / "big.pth")
    loaded = torch.load(tmp_path / "big.pth", mmap=True, weights_only=True)
    mapped = MappedFile(tmp_path / "big.pth")
    assert mapped.contains(loaded["w"]) and not mapped.contains(big)
    target = torch.empty_like(big)
    base = rss_file()
    target.copy_(loaded["w"])
    assert rss_file() - base > 48 * 2**20  # the copy made the file's pages resident
    mapped.release([loaded["w"], big])  # ``big`` is not in the mapping: left alone
    assert rss_file() - base < 8 * 2**20
    assert torch.equal(target, big) and torch.equal(loaded["w"], big)  # re-read from the file if touched


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path: Path, source: dict[str, torch.Tensor], suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    save_file(source, full) if suffix == ".safetensors" else torch.save(source, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or not a valid weights file"):
        read_state_dict(cut)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".ckpt"])
@pytest.mark.parametrize("content", [b"", b"garbage", os.urandom(4096)], ids=["empty", "text", "random"])
def test_garbage_bytes(tmp_path: Path, suffix: str, content: bytes) -> None:
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="truncated or not a valid weights file"):
        read_state_dict(path)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"does not exist; check the path given with --weights"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unknown weights file type 'w.npz'.*\.safetensors"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "gone.pth")))


def test_file_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match=r"contains no tensors .*epoch, lr"):
        read_state_dict(tmp_path / "meta.pth")


def test_directory_with_model_safetensors(tmp_path: Path, source: dict[str, torch.Tensor]) -> None:
    save_file(source, tmp_path / "model.safetensors")
    assert set(read_state_dict(tmp_path)) == set(source)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"holds none of model\.safetensors"):
        read_state_dict(empty)
