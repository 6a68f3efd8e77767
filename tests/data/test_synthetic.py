"""The synthetic dataset: layout, determinism, a real distribution shift, and learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ftsgd.data.synthetic import (
    SOURCE_SHAPES,
    TARGET_SHAPES,
    class_names,
    make_image_folder,
    make_source_folder,
    make_target_folder,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root: Path, split: str) -> np.ndarray:
    files = sorted((root / split).rglob("*.png"))
    return np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in files])


def test_layout_and_counts(image_folder: Path) -> None:
    assert sorted(p.name for p in image_folder.iterdir()) == ["ood", "train", "val"]
    for split, n in {"train": 24, "val": 8, "ood": 8}.items():
        classes = sorted(p.name for p in (image_folder / split).iterdir())
        assert classes == sorted(["circle", "square", "triangle"])
        for cls in classes:
            files = list((image_folder / split / cls).iterdir())
            assert len(files) == n
            assert all(f.suffix == ".png" for f in files)
    with Image.open(next((image_folder / "train" / "circle").iterdir())) as img:
        assert (img.mode, img.size) == ("RGB", (32, 32))


def test_custom_counts_size_format_and_many_classes(tmp_path: Path) -> None:
    root = make_image_folder(
        tmp_path, classes=12, per_class={"train": 2, "test": 1, "ood": 0}, size=20, fmt="jpg"
    )
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]  # 0 images -> split skipped
    names = class_names(12)
    assert names[:3] == ["circle", "square", "triangle"] and names[10:] == ["class_10", "class_11"]
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(names)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 24
    with Image.open(files[0]) as img:
        assert (img.format, img.size) == ("JPEG", (20, 20))


def test_deterministic_per_seed(tmp_path: Path) -> None:
    kwargs = {"classes": 3, "per_class": {"train": 3, "ood": 2}, "size": 24}
    a = _files(make_image_folder(tmp_path / "a", seed=7, **kwargs))
    b = _files(make_image_folder(tmp_path / "b", seed=7, **kwargs))
    c = _files(make_image_folder(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_ood_is_shifted(image_folder: Path) -> None:
    val, ood = _pixels(image_folder, "val"), _pixels(image_folder, "ood")
    # Bright background instead of a dark one, and much more pixel noise.
    assert ood.mean() > val.mean() + 80
    val_noise = np.abs(np.diff(val, axis=2)).mean()
    ood_noise = np.abs(np.diff(ood, axis=2)).mean()
    assert ood_noise > 2 * val_noise


def test_val_and_train_are_different_images(image_folder: Path) -> None:
    train = _files(image_folder / "train" / "circle")
    val = _files(image_folder / "val" / "circle")
    assert not set(train.values()) & set(val.values())


@pytest.mark.parametrize("bad", [{"classes": 1}, {"size": 4}, {"seed": -1}, {"fmt": "gif"}])
def test_rejects_bad_arguments(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        make_image_folder(tmp_path, **bad)


def test_learnable_in_distribution_and_harder_ood(image_folder: Path) -> None:
    """A tiny CNN learns the classes in a few epochs; the shifted split is clearly harder."""

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for k, cls in enumerate(sorted(p.name for p in (image_folder / split).iterdir())):
            for f in sorted((image_folder / split / cls).iterdir()):
                xs.append(np.asarray(Image.open(f), dtype=np.float32) / 255.0)
                ys.append(k)
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)

    (xt, yt), (xv, yv), (xo, yo) = load("train"), load("val"), load("ood")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mean, std = xt.mean((0, 2, 3), keepdim=True), xt.std((0, 2, 3), keepdim=True)
    for _ in range(4):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 16):
            idx = perm[i : i + 16]
            loss = nn.functional.cross_entropy(model((xt[idx] - mean) / std), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        val_acc = (model((xv - mean) / std).argmax(1) == yv).float().mean().item()
        ood_acc = (model((xo - mean) / std).argmax(1) == yo).float().mean().item()
    assert val_acc >= 0.9
    assert ood_acc < val_acc - 0.15


def _brightness(folder: Path) -> list[float]:
    return [float(np.asarray(Image.open(f)).mean()) for f in sorted(folder.rglob("*.png"))]


def test_source_and_target_tasks_for_the_comparison_demo(tmp_path: Path) -> None:
    source = make_source_folder(tmp_path / "a", per_class={"train": 20, "val": 2}, size=16)
    make_source_folder(tmp_path / "b", per_class={"train": 20, "val": 2}, size=16)
    target = make_target_folder(tmp_path / "t", per_class={"train": 6, "val": 2, "ood": 6}, size=16)
    assert sorted(p.name for p in (source / "train").iterdir()) == sorted(SOURCE_SHAPES)
    assert sorted(p.name for p in (target / "ood").iterdir()) == sorted(TARGET_SHAPES)
    assert not set(SOURCE_SHAPES) & set(TARGET_SHAPES)
    assert len(_files(source)) == 6 * 22 and _files(source) == _files(tmp_path / "b")  # byte-identical
    # the target's train split is all plain (dark), its ood split all shifted (bright); the source mixes both
    assert max(_brightness(target / "train")) < 110 < min(_brightness(target / "ood"))
    bright = [b > 110 for b in _brightness(source / "train")]
    assert 0.3 < sum(bright) / len(bright) < 0.7
    # random hues: one class's mean colour varies from image to image (no colour shortcut)
    star = sorted((target / "train" / "star").glob("*.png"))
    colours = np.stack([np.asarray(Image.open(f)).reshape(-1, 3).mean(0) for f in star])
    assert np.ptp(colours, axis=0).max() > 10
