"""Split discovery, image loading, transforms and deterministic, resumable loaders."""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftsgd.data.dataset import EpochSampler, ImageDataset
from ftsgd.data.folders import REPEATED_FOLDER, Split, discover_splits, find_classes
from ftsgd.data.ignored import ignored_warnings
from ftsgd.data.images import load_image
from ftsgd.data.loader import RunLoader, build_loader, resolve_num_workers
from ftsgd.data.scan import check_image
from ftsgd.data.transforms import build_transform
from ftsgd.errors import DataError
from ftsgd.recipe.schema import DataConfig

# Like timm's test_vit data config, but tiny and with per-channel statistics so a mix-up shows.
DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "interpolation": "bicubic",
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.5),
    "crop_pct": 0.95,
    "crop_mode": "center",
}


def _cfg(root: Path, **kwargs: object) -> DataConfig:
    return DataConfig(root=str(root), **kwargs)


def _batches(loader: torch.utils.data.DataLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# --------------------------------------------------------------------------- discovery


def test_discovers_train_val_and_ood(image_folder: Path) -> None:
    classes, splits = discover_splits(_cfg(image_folder))
    assert classes == ["circle", "square", "triangle"]
    assert list(splits) == ["train", "val", "ood"]
    assert [len(s) for s in splits.values()] == [72, 24, 24]
    train = splits["train"]
    assert isinstance(train, Split) and train.root == image_folder / "train"
    assert train.classes == ("circle", "square", "triangle")
    assert [label for _, label in train.samples] == [0] * 24 + [1] * 24 + [2] * 24
    assert all(path.parent.name == classes[label] for path, label in splits["ood"].samples)


def test_extra_splits_auto_found_and_non_splits_ignored(make_folder) -> None:
    layout = {s: {"a": 1, "b": 1} for s in ("train", "val", "test", "ood")}
    root = make_folder(layout)
    (root / "runs").mkdir()
    (root / "runs" / "log.txt").write_text("not a split")
    (root / "notes" / "drafts").mkdir(parents=True)  # class-like folder, but no images
    make_folder({".cache": {"a": 1}}, root=root)  # hidden folders are never splits
    (root / "README.md").write_text("hi")
    _, splits = discover_splits(_cfg(root))
    assert list(splits) == ["train", "val", "ood", "test"]


def test_explicit_eval_splits_names_and_absolute_paths(make_folder, tmp_path: Path) -> None:
    root = make_folder({s: {"a": 1, "b": 1} for s in ("train", "val", "test", "ood")})
    elsewhere = make_folder({"shifted": {"b": 2}})
    cfg = _cfg(root, eval_splits=["val", "test", str(elsewhere / "shifted")])
    _, splits = discover_splits(cfg)
    assert list(splits) == ["train", "val", "test", "shifted"]  # "ood" not listed; "val" not repeated
    assert splits["shifted"].classes == ("b",)
    assert [label for _, label in splits["shifted"].samples] == [1, 1]

    with pytest.raises(DataError, match=r"evaluation split 'nope'.*does not exist"):
        discover_splits(_cfg(root, eval_splits=["nope"]))


def test_absolute_train_and_val_paths(make_folder) -> None:
    data = make_folder({"tr": {"x": 2, "y": 1}, "va": {"x": 1, "y": 1}})
    empty_root = data.parent / "empty_root"
    empty_root.mkdir()
    classes, splits = discover_splits(_cfg(empty_root, train=str(data / "tr"), val=str(data / "va")))
    assert classes == ["x", "y"]
    assert list(splits) == ["train", "val"]
    assert splits["train"].root == data / "tr"


def test_class_missing_from_train_names_split_and_class(make_folder) -> None:
    root = make_folder(
        {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "dog": 1}, "ood": {"cat": 1, "zebra": 1}}
    )
    with pytest.raises(DataError) as info:
        discover_splits(_cfg(root))
    msg = str(info.value)
    assert "ood split" in msg and "'zebra'" in msg and "cat, dog" in msg
    assert "'cat'" not in msg
    assert "data.eval_splits" in msg  # ood/ was auto-discovered: say how to leave it out

    root = make_folder({"train": {"cat": 1}, "val": {"cat": 1, "zebra": 1}})
    with pytest.raises(DataError, match=r"val split .*lacks: 'zebra'") as info:
        discover_splits(_cfg(root))
    assert "eval_splits" not in str(info.value)


def test_split_may_lack_some_classes(make_folder) -> None:
    root = make_folder({"train": {"a": 1, "b": 1, "c": 1}, "val": {"c": 2}})
    _, splits = discover_splits(_cfg(root))
    assert splits["val"].classes == ("c",)
    assert [label for _, label in splits["val"].samples] == [2, 2]


def test_missing_root_train_or_val(make_folder, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dataset folder given"):
        discover_splits(DataConfig())
    with pytest.raises(DataError, match=r"does not exist; expected layout: <root>/train/<class>"):
        discover_splits(_cfg(tmp_path / "missing"))
    root = make_folder({"train": {"a": 1}})
    with pytest.raises(DataError) as info:
        discover_splits(_cfg(root))
    assert str(root / "val") in str(info.value) and "expected layout" in str(info.value)
    root = make_folder({"val": {"a": 1}})
    with pytest.raises(
        DataError, match=r"train split folder .*train does not exist \(data.train = 'train'\)"
    ):
        discover_splits(_cfg(root))


def test_empty_class_folder_and_empty_split(make_folder) -> None:
    root = make_folder({"train": {"a": 2, "b": 0}, "val": {"a": 1}})
    with pytest.raises(DataError, match=r"train split .*class folder\(s\) without images: b"):
        discover_splits(_cfg(root))
    root = make_folder({"train": {"a": 1, "b": 1}})
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"val split .* is empty: it has no class sub-folders"):
        discover_splits(_cfg(root))
    root = make_folder({"val": {"a": 1}})
    make_folder({"": {"train": 2}}, root=root)  # images directly in train/
    with pytest.raises(DataError, match=r"holds 2 image\(s\) directly instead of one sub-folder per class"):
        discover_splits(_cfg(root))


def test_extensions_case_insensitive_nested_and_non_images_ignored(make_folder) -> None:
    root = make_folder({"train": {"a": 1, "b": 1}, "val": {"a": 1}})
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "UPPER.JPG", format="JPEG")
    (root / "train" / "a" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "sub" / "deep.BMP", format="BMP")
    (root / "train" / "a" / "labels.csv").write_text("x")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"")
    _, splits = discover_splits(_cfg(root))
    names = sorted(p.name for p, label in splits["train"].samples if label == 0)
    assert names == ["0.png", "UPPER.JPG", "deep.BMP"]
    assert [(i.path.name, i.reason) for i in splits["train"].ignored] == [("labels.csv", ".csv")]


def test_class_names_matched_by_name(make_folder) -> None:
    # Folder order (sorted: apple, banana, cherry) differs from the model's class order.
    model_classes = ["cherry", "apple", "banana"]
    root = make_folder({"val": {"apple": 1, "banana": 2, "cherry": 1}, "test": {"banana": 1}})
    classes, splits = discover_splits(_cfg(root), class_names=model_classes)
    assert classes == model_classes
    assert "train" not in splits  # evaluating needs no training data
    labels = {p.parent.name: label for p, label in splits["val"].samples}
    assert labels == {"cherry": 0, "apple": 1, "banana": 2}
    assert [label for _, label in splits["test"].samples] == [2]

    with pytest.raises(DataError, match=r"val split .*the model's class list lacks: 'banana'"):
        discover_splits(_cfg(root), class_names=["apple", "cherry"])


def test_duplicate_split_names_rejected(make_folder) -> None:
    root = make_folder({"train": {"a": 1, "b": 1}, "val": {"a": 1}})
    one = make_folder({"test": {"a": 1}})
    two = make_folder({"test": {"a": 1}})
    with pytest.raises(DataError, match="two splits are both named 'test'"):
        discover_splits(_cfg(root, eval_splits=[str(one / "test"), str(two / "test")]))


def test_find_classes_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ("b", "a", ".ipynb_checkpoints", "C"):
        (tmp_path / name).mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    assert find_classes(tmp_path) == ["C", "a", "b"]


def test_single_class_train_split_refused(make_folder) -> None:
    root = make_folder({"train": {"only": 3}, "val": {"only": 1}})
    with pytest.raises(DataError) as info:
        discover_splits(_cfg(root))
    assert str(info.value) == (
        f"train split {root / 'train'} has a single class folder ('only'); a classifier needs at least "
        "two classes, one sub-folder of train/ each"
    )
    # Evaluating a two-class model on a split that holds one of its classes is fine.
    classes, splits = discover_splits(_cfg(root), class_names=["only", "other"])
    assert classes == ["only", "other"] and len(splits["val"]) == 1


# --------------------------------------------------------------------------- links and ignored files


def _labels_by_folder(split: Split, classes: list[str]) -> dict[str, int]:
    """How many samples each class folder's label got, checking each sample sits in its class folder."""
    counts: dict[str, int] = {}
    for path, label in split.samples:
        assert path.relative_to(split.root).parts[0] == classes[label], path
        counts[classes[label]] = counts.get(classes[label], 0) + 1
    return counts


def test_link_loops_and_repeated_links_read_each_folder_once(make_folder, tmp_path: Path) -> None:
    root = make_folder({"train": {"a": 12, "b": 12}, "val": {"a": 1, "b": 1}})
    train = root / "train"
    (train / "a" / "loop").symlink_to("..")  # the split folder: the case that made 24 images 984
    (train / "a" / "self").symlink_to(".")
    (train / "b" / "up").symlink_to("../..")  # the dataset folder, which holds val/ too
    make_folder({"": {"sub": 2}}, root=train / "a")  # a real nested folder ...
    (train / "a" / "again").symlink_to("sub")  # ... and a second way to it, sorted before it
    outside = make_folder({"": {"extra": 3}}, root=tmp_path / "elsewhere")
    (train / "b" / "more").symlink_to(outside / "extra")  # a link out of the dataset is followed

    classes, splits = discover_splits(_cfg(root))
    train_split = splits["train"]
    assert len(train_split) == 12 + 2 + 12 + 3
    assert _labels_by_folder(train_split, classes) == {"a": 14, "b": 15}
    assert len({p.resolve() for p, _ in train_split.samples}) == len(train_split)
    assert sorted(p.relative_to(train).as_posix() for p, _ in train_split.samples if "sub" in p.parts) == [
        "a/sub/0.png",
        "a/sub/1.png",
    ]  # read at its real path, not through the link
    repeated = sorted(i.path.relative_to(train).as_posix() for i in train_split.ignored)
    assert repeated == ["a/again", "a/loop", "a/self", "b/up"]
    assert {i.reason for i in train_split.ignored} == {REPEATED_FOLDER}
    (message,) = ignored_warnings(splits, root)
    assert message.startswith("did not follow 4 folder link(s) to a folder already read (a link loop")
    assert f"train/a/again -> {(train / 'a' / 'sub').resolve()}" in message


def test_link_to_another_class_folder_is_refused(make_folder) -> None:
    root = make_folder({"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    (root / "train" / "cat" / "dogs").symlink_to("../dog")
    with pytest.raises(DataError) as info:
        discover_splits(_cfg(root))
    assert str(info.value) == (
        f"train split {root / 'train'}: {root / 'train' / 'dog'} and {root / 'train' / 'cat' / 'dogs'} are "
        "the same folder, reached from class folders 'cat' and 'dog', so its images would be labelled as "
        "both. Remove the link (links are followed, but a folder belongs to one class)"
    )
    (root / "train" / "cat" / "dogs").unlink()
    shutil.rmtree(root / "val" / "dog")
    (root / "val" / "dog").symlink_to("cat")  # a class folder that is another class's folder
    with pytest.raises(DataError, match=r"val split .*reached from class folders 'cat' and 'dog'"):
        discover_splits(_cfg(root, eval_splits=["val"]))


def test_a_file_link_is_a_file_of_the_folder_it_is_in(make_folder) -> None:
    """Linking a file into a class folder labels it with that folder's class (deliberate oversampling
    or sharing); only folders are read once per split."""
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    (root / "train" / "a" / "copy.png").symlink_to("0.png")
    (root / "train" / "b" / "from_a.png").symlink_to("../a/1.png")
    classes, splits = discover_splits(_cfg(root))
    assert _labels_by_folder(splits["train"], classes) == {"a": 3, "b": 2}
    assert splits["train"].ignored == ()


def test_files_that_are_not_images_are_counted_and_explained(make_folder) -> None:
    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    a, b = root / "train" / "a", root / "train" / "b"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(a / "IMG_0001", format="JPEG")  # an image without extension
    (a / "README").write_text("notes")
    (a / "notes.txt").write_text("x")
    (b / "notes.txt").write_text("x")
    (root / "val" / "b" / "log.txt").write_text("x")
    (b / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (b / "scan.psd").write_bytes(b"8BPS")
    (root / "train" / "labels.csv").write_text("path,label")
    (a / ".DS_Store").write_bytes(b"\x00")  # hidden files are never reported
    Image.new("RGB", (8, 8)).save(a / "web.gif")  # read, not ignored
    Image.new("RGB", (8, 8)).save(a / "photo.jfif", format="JPEG")

    _, splits = discover_splits(_cfg(root))
    assert sorted(p.name for p, _ in splits["train"].samples) == [
        "0.png", "0.png", "1.png", "1.png", "photo.jfif", "web.gif",
    ]  # fmt: skip
    messages = ignored_warnings(splits, root)
    assert messages == [
        "ignored 8 file(s) that are not images in a class folder:\n"
        "  .txt files (3): not an image type; e.g. train/a/notes.txt, train/b/notes.txt, val/b/log.txt\n"
        "  files without extension (2): ftsgd recognises images by their extension (.jpg, .png, .gif, ...); "
        "rename those that are images; e.g. train/a/IMG_0001 (a JPEG image), train/a/README\n"
        "  .heic files (1): PIL reads HEIC/HEIF photos only with the pillow-heif package, which ftsgd does "
        "not use; convert them to JPEG; e.g. train/b/IMG_0002.HEIC\n"
        "  .psd files (1): an image type ftsgd does not read; convert them to PNG or JPEG; e.g. "
        "train/b/scan.psd\n"
        "  files outside any class folder (1): files directly in a split folder have no class; images "
        "belong in <split>/<class>/; e.g. train/labels.csv"
    ]
    assert ignored_warnings({"val": splits["val"]}, root) == [
        "ignored 1 file(s) that are not images in a class folder:\n"
        "  .txt files (1): not an image type; e.g. val/b/log.txt"
    ]
    assert ignored_warnings({"train": replace(splits["train"], ignored=())}) == []


def test_class_folder_of_unread_files_says_what_it_holds(make_folder) -> None:
    root = make_folder({"train": {"a": 2, "b": 0}, "val": {"a": 1}})
    for i in range(2):
        (root / "train" / "b" / f"IMG_{i}.heic").write_bytes(b"heic")
    (root / "train" / "b" / "IMG_9").write_bytes(b"?")
    with pytest.raises(DataError, match=re.escape(
        "class folder(s) without images: b (it holds 3 file(s) that are not read as images: 2 .heic, "
        "1 without extension)."
    )):  # fmt: skip
        discover_splits(_cfg(root))


# --------------------------------------------------------------------------- image loading


def _odd_images(folder: Path) -> dict[str, Path]:
    """Images in modes a plain ``convert('RGB')`` pipeline gets wrong or crashes on."""
    folder.mkdir(parents=True, exist_ok=True)
    grad = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    paths = {}

    def save(name: str, img: Image.Image, **kw: object) -> None:
        paths[name] = folder / name
        img.save(paths[name], **kw)

    save("grey.png", Image.fromarray(grad))
    save("grey.pgm", Image.fromarray(grad))
    save("la.png", Image.fromarray(np.stack([grad, grad], -1)))
    save("rgba.png", Image.fromarray(np.dstack([grad, grad, grad, np.full_like(grad, 128)])))
    pal = Image.fromarray(grad).convert("P")
    pal.info["transparency"] = 0
    save("palette.png", pal, transparency=0)
    save("cmyk.jpg", Image.new("CMYK", (16, 16), (10, 20, 30, 40)))
    save("bilevel.bmp", Image.fromarray(grad > 128).convert("1"))
    save("grey16.png", Image.fromarray(grad.astype(np.uint16) * 257))
    save("grey16.tif", Image.fromarray(grad.astype(np.uint16) * 257))
    save("grey32.tif", Image.fromarray(grad.astype(np.int32) * 257))  # mode "I", 16-bit values
    save("float.tif", Image.fromarray(grad.astype(np.float32) / 255.0))
    return paths


def test_odd_modes_load_as_rgb_tensors(tmp_path: Path) -> None:
    paths = _odd_images(tmp_path / "train" / "a")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "b.png")  # outside a class: not a sample
    (tmp_path / "train" / "b").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "b" / "0.png")
    for path in paths.values():
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (16, 16), path.name
    _, splits = discover_splits(_cfg(tmp_path, val="train"))
    ds = ImageDataset(splits["train"], build_transform(DATA_CONFIG, "none", training=False))
    assert len(ds) == len(paths) + 1
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == (i == len(paths))


@pytest.mark.parametrize("name", ["grey16.png", "grey16.tif", "grey32.tif", "float.tif"])
def test_high_bit_depth_is_scaled_not_clipped(tmp_path: Path, name: str) -> None:
    path = _odd_images(tmp_path)[name]
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I", "F")
    expected = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    got = np.asarray(load_image(path))
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
    assert (got[..., 0] == got[..., 2]).all()


def test_unreadable_image_is_a_data_error(make_folder) -> None:
    root = make_folder({"train": {"a": 1, "b": 1}, "val": {"a": 1}})
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _, splits = discover_splits(_cfg(root))
    ds = ImageDataset(splits["train"], None)
    with pytest.raises(DataError, match=r"cannot read image .*broken.png.*Remove or replace"):
        ds[[p.name for p, _ in ds.samples].index("broken.png")]


def test_gif_is_read_first_frame_as_rgb(tmp_path: Path) -> None:
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    for frame in frames:
        frame.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], transparency=1)
    assert check_image(tmp_path / "anim.gif") is None
    img = load_image(tmp_path / "anim.gif")
    assert img.mode == "RGB" and img.size == (8, 8) and img.getpixel((0, 0)) == (200, 10, 10)


def _exif_jpeg(path: Path, orientation: int | None, exif: bytes | None = None) -> None:
    """A 24x12 JPEG stored sideways: left half black, right half white, with an EXIF orientation tag."""
    pixels = np.zeros((12, 24, 3), dtype=np.uint8)
    pixels[:, 12:] = 255
    if exif is None:
        tags = Image.Exif()
        if orientation is not None:
            tags[0x0112] = orientation
        exif = tags.tobytes()
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)


@pytest.mark.parametrize(
    ("orientation", "size", "dark"),
    [
        (None, (24, 12), "left"),
        (1, (24, 12), "left"),
        (3, (24, 12), "right"),  # upside down
        (6, (12, 24), "top"),  # the phone was held upright: rotate 90 degrees clockwise
        (8, (12, 24), "bottom"),
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int | None, size, dark: str) -> None:
    path = tmp_path / "photo.jpg"
    _exif_jpeg(path, orientation)
    img = load_image(path)
    assert img.size == size
    grey = np.asarray(img.convert("L")).astype(int)
    w, h = size
    halves = {
        "left": (grey[:, : w // 2], grey[:, w // 2 :]),
        "right": (grey[:, w // 2 :], grey[:, : w // 2]),
        "top": (grey[: h // 2], grey[h // 2 :]),
        "bottom": (grey[h // 2 :], grey[: h // 2]),
    }
    black, white = halves[dark]
    assert black.mean() < 20 and white.mean() > 235
    assert check_image(path) is None
    # What training and evaluation see: the dataset loads through load_image.
    (tmp_path / "train" / "a").mkdir(parents=True)
    path.rename(tmp_path / "train" / "a" / "photo.jpg")
    (tmp_path / "train" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "b" / "x.png")
    _, splits = discover_splits(_cfg(tmp_path, val="train"))
    assert ImageDataset(splits["train"], None)[0][0].size == size


def test_damaged_exif_keeps_the_image_as_stored(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    _exif_jpeg(path, None, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    with warnings.catch_warnings(record=True) as caught:
        img = load_image(path)
        assert check_image(path) is None
    assert img.size == (24, 12)
    assert [str(w.message) for w in caught] == []


def test_image_over_pil_pixel_limit_is_too_large_without_pil_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftsgd.data.scan import preflight_scan

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so a 40x40 image is over PIL's limit
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(root / "train" / cls / "small.png")
    Image.new("RGB", (40, 40)).save(root / "train" / "a" / "big.png")  # 1600 pixels: PIL warns
    Image.new("L", (50, 50)).save(root / "train" / "b" / "huge.png")  # 2500 > 2 x limit: PIL refuses
    _, splits = discover_splits(_cfg(root, val="train"))
    with warnings.catch_warnings(record=True) as caught:
        assert check_image(root / "train" / "a" / "big.png") == (
            "too large",
            "40x40 = 1,600 pixels, over PIL's decompression-bomb limit of 1,000; downscale it",
        )
        with pytest.raises(DataError) as info:
            preflight_scan(splits, root=root, workers=4)
        kept, skipped = preflight_scan(splits, on_bad_image="skip", root=root, workers=4)
        load_image(root / "train" / "a" / "big.png")  # still loads if asked to
    assert [str(w.message) for w in caught] == []
    assert "2 of 4 image files under" in str(info.value) and "  too large (2):" in str(info.value)
    assert "train/b/huge.png: Image size (2500 pixels) exceeds limit of 2000 pixels" in str(info.value)
    assert sorted(b.path.name for b in skipped) == ["big.png", "huge.png"]
    assert len(kept["train"]) == 2


# --------------------------------------------------------------------------- transforms


def test_eval_transform_normalises_with_model_mean_std() -> None:
    rgb = (10, 128, 250)
    x = build_transform(DATA_CONFIG, "rrc_flip", training=False)(Image.new("RGB", (40, 30), rgb))
    assert x.shape == (3, 16, 16)
    for c in range(3):
        expected = (rgb[c] / 255.0 - DATA_CONFIG["mean"][c]) / DATA_CONFIG["std"][c]
        torch.testing.assert_close(x[c], torch.full((16, 16), expected), atol=1e-5, rtol=0)


def test_training_transforms_normalise_too_and_ignore_extra_config_keys() -> None:
    config = {**DATA_CONFIG, "first_conv": "patch_embed.proj", "num_classes": 1000}
    img = Image.new("RGB", (24, 24), (255, 0, 51))
    expected = torch.tensor(
        [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 51), config["mean"], config["std"], strict=True)]
    )
    for augment in ("rrc_flip", "flip", "none"):
        x = build_transform(config, augment, training=True)(img)
        assert x.shape == (3, 16, 16)
        torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


def test_rrc_flip_has_no_colour_jitter_or_erasing() -> None:
    names = [type(t).__name__ for t in build_transform(DATA_CONFIG, "rrc_flip", training=True).transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not any("Jitter" in n or "Erasing" in n or "Augment" in n for n in names)


def test_unknown_augment_rejected() -> None:
    with pytest.raises(ValueError, match="unknown augment"):
        build_transform(DATA_CONFIG, "mixup", training=True)


def test_augment_none_equals_eval(image_folder: Path) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    train = splits["train"]
    eval_ds = ImageDataset(train, build_transform(DATA_CONFIG, "rrc_flip", training=False))
    none_ds = ImageDataset(train, build_transform(DATA_CONFIG, "none", training=True), training=True, epoch=3)
    for i in (0, 30, 71):
        assert torch.equal(eval_ds[i][0], none_ds[i][0])


def test_flip_is_eval_or_its_mirror(image_folder: Path) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    eval_ds = ImageDataset(splits["train"], build_transform(DATA_CONFIG, "none", training=False))
    flip_ds = ImageDataset(
        splits["train"], build_transform(DATA_CONFIG, "flip", training=True), training=True
    )
    flipped = 0
    for i in range(12):
        ref, got = eval_ds[i][0], flip_ds[i][0]
        if torch.equal(got, ref.flip(-1)) and not torch.equal(got, ref):
            flipped += 1
        else:
            assert torch.equal(got, ref)
    assert 0 < flipped < 12


def test_rrc_flip_pure_function_of_seed_epoch_index(image_folder: Path) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    tf = build_transform(DATA_CONFIG, "rrc_flip", training=True)
    a = ImageDataset(splits["train"], tf, training=True, seed=1)
    b = ImageDataset(splits["train"], tf, training=True, seed=1)
    b[5], b[9]  # loading other samples first must not matter
    assert torch.equal(a[7][0], b[7][0])
    first = a[7][0]
    a.set_epoch(1)
    assert not torch.equal(a[7][0], first)
    c = ImageDataset(splits["train"], tf, training=True, seed=2)
    assert not torch.equal(c[7][0], first)


# --------------------------------------------------------------------------- sampler and loader


def test_epoch_sampler_orders() -> None:
    s = EpochSampler(10, shuffle=True, seed=3, epoch=0)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and e0 != list(range(10))
    assert list(EpochSampler(10, shuffle=True, seed=3, epoch=0)) == e0
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0, start=4)
    assert list(s) == e0[4:] and len(s) == 6
    assert list(EpochSampler(5, shuffle=False, seed=3, epoch=7, start=2)) == [2, 3, 4]
    assert len(EpochSampler(5, start=9)) == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_epoch_equals_tail_of_full_epoch(image_folder: Path, num_workers: int) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    tf = build_transform(DATA_CONFIG, "rrc_flip", training=True)
    kwargs = {"batch_size": 8, "training": True, "seed": 5, "epoch": 2}
    full = _batches(build_loader(splits["train"], tf, **kwargs))
    assert len(full) == 9  # 72 images, nothing dropped
    resumed_loader = build_loader(splits["train"], tf, start_batch=4, num_workers=num_workers, **kwargs)
    assert len(resumed_loader) == 5
    resumed = _batches(resumed_loader)
    assert len(resumed) == 5
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)
    if num_workers:
        # The whole epoch, too, does not depend on the number of workers.
        same = _batches(build_loader(splits["train"], tf, num_workers=num_workers, **kwargs))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full, same, strict=True))


def test_epochs_differ_and_eval_loader_is_sequential(image_folder: Path) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    tf = build_transform(DATA_CONFIG, "rrc_flip", training=True)
    e0 = torch.cat([y for _, y in build_loader(splits["train"], tf, batch_size=16, training=True, seed=0)])
    e1 = torch.cat(
        [y for _, y in build_loader(splits["train"], tf, batch_size=16, training=True, seed=0, epoch=1)]
    )
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and not torch.equal(e0, e1)
    val = splits["val"]
    loader = build_loader(
        val, build_transform(DATA_CONFIG, "rrc_flip", False), batch_size=5, training=False, seed=0
    )
    labels = torch.cat([y for _, y in loader]).tolist()
    assert labels == [label for _, label in val.samples] and len(loader) == 5  # 24 = 4*5 + 4


def _children() -> set[int]:
    """PIDs of this process's child processes (Linux)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_one_run_loader_gives_build_loaders_batches_with_the_same_workers_throughout(
    image_folder: Path,
) -> None:
    """Epochs (from any batch, with drop_last, as one process's share of a job) and evaluation splits, in
    any order: the same tensors as a new DataLoader per pass, from worker processes started once."""
    _, splits = discover_splits(_cfg(image_folder))
    train_tf = build_transform(DATA_CONFIG, "rrc_flip", training=True)
    eval_tf = build_transform(DATA_CONFIG, "none", training=False)
    before = _children()
    run = RunLoader((splits["train"], train_tf), {"val": splits["val"]}, eval_tf, seed=3, num_workers=2,
                    input_size=(3, 16, 16))  # fmt: skip
    workers = None
    passes = [
        dict(epoch=0, start_batch=0, drop_last=False, shard=None),
        dict(epoch=1, start_batch=2, drop_last=True, shard=None),
        None,  # the val split
        dict(epoch=1, start_batch=1, drop_last=False, shard=(4, 1, 2)),
        None,
        dict(epoch=2, start_batch=0, drop_last=True, shard=(4, 0, 3)),
    ]
    for p in passes:
        if p is None:
            got = _batches(run.evaluation("val", batch_size=5))
            want = _batches(build_loader(splits["val"], eval_tf, batch_size=5, training=False, seed=3))
        else:
            got = _batches(run.train_epoch(p["epoch"], batch_size=16, start_batch=p["start_batch"],
                                           drop_last=p["drop_last"], shard=p["shard"]))  # fmt: skip
            want = _batches(build_loader(splits["train"], train_tf, batch_size=16, training=True, seed=3,
                                         input_size=(3, 16, 16), **p))  # fmt: skip
        assert len(got) == len(want) > 0
        for (xa, ya), (xb, yb) in zip(got, want, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        mine = _children() - before
        workers = workers or mine
        assert len(workers) == 2 and mine == workers, "the same two worker processes serve every pass"


def test_main_process_loading_leaves_global_rng_alone(image_folder: Path) -> None:
    _, splits = discover_splits(_cfg(image_folder))
    tf = build_transform(DATA_CONFIG, "rrc_flip", training=True)

    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), torch.rand(()).item()

    def seed_all() -> None:
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)

    seed_all()
    expected = draws()
    seed_all()
    for _ in build_loader(splits["train"], tf, batch_size=16, training=True, seed=0, num_workers=0):
        pass
    assert draws() == expected


def test_resolve_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_num_workers(0) == 0
    assert resolve_num_workers(3) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert resolve_num_workers(-1) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_num_workers(-1) == 8
    with pytest.raises(ValueError):
        resolve_num_workers(-2)


# --------------------------------------------------------------------------- pre-flight scan


def test_scan_accepts_odd_modes_and_finds_truncation_verify_misses(tmp_path: Path) -> None:
    from ftsgd.data.scan import check_image

    for path in _odd_images(tmp_path / "odd").values():
        assert check_image(path) is None, path.name
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with Image.open(tmp_path / "cut.jpg") as img:
        img.verify()  # PIL's verify() does not notice a truncated JPEG ...
    kind, detail = check_image(tmp_path / "cut.jpg")  # ... decoding (at 1/8 scale) does
    assert kind == "truncated" and "truncated" in detail


def test_preflight_skip_drops_files_and_recomputes_classes(make_folder) -> None:
    from ftsgd.data.scan import preflight_scan

    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "val" / "b" / "0.png").write_bytes(b"")
    (root / "train" / "a" / "x.png").write_bytes(b"GIF89a")
    _, splits = discover_splits(_cfg(root))
    with pytest.raises(DataError, match=r"2 of 7 image files under .* cannot be read") as info:
        preflight_scan(splits, root=root)
    assert "train/a/x.png" in str(info.value) and "val/b/0.png" in str(info.value)

    kept, skipped = preflight_scan(splits, on_bad_image="skip", root=root)
    assert [(b.split, b.path.name, b.kind) for b in skipped] == [
        ("train", "x.png", "not an image"),
        ("val", "0.png", "empty file"),
    ]
    assert len(kept["train"]) == 4 and kept["train"].classes == ("a", "b")
    assert len(kept["val"]) == 1 and kept["val"].classes == ("a",)  # an eval split may lack a class
    assert [label for _, label in kept["val"].samples] == [0]
    assert preflight_scan(kept, on_bad_image="skip") == (kept, [])
    with pytest.raises(ValueError, match="on_bad_image"):
        preflight_scan(splits, on_bad_image="ignore")


def test_preflight_checks_a_file_shared_by_two_splits_once(make_folder, monkeypatch) -> None:
    import ftsgd.data.scan

    root = make_folder({"train": {"a": 3, "b": 1}})
    _, splits = discover_splits(_cfg(root, val="train"))
    seen: list[Path] = []
    real = ftsgd.data.scan.check_image
    monkeypatch.setattr(ftsgd.data.scan, "check_image", lambda p: seen.append(p) or real(p))
    ftsgd.data.scan.preflight_scan(splits)
    assert len(seen) == 4


def test_iter_image_files_streams_by_the_class_folder_rules(tmp_path: Path) -> None:
    from ftsgd.data.folders import REPEATED_FOLDER, IgnoredFile, iter_image_files

    root = tmp_path / "drop"
    names = [
        "b.png",
        "a/x.jpg",
        "a/sub/y.PNG",
        "a-z.webp",
        "a/.hidden.png",
        ".cache/z.png",
        "a/notes.txt",
        "c.gif",
        "elsewhere/w.jpeg",
    ]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"")
    (root / "a" / "loop").symlink_to(tmp_path)  # a folder above: a loop, never followed
    (root / "again").symlink_to(root / "a" / "sub")  # a second way to a folder: read once
    (root / "0-out").symlink_to(outside)  # sorts first, but links are read after the real folders
    ignored: list[IgnoredFile] = []
    got = list(iter_image_files(root, on_ignored=ignored.append))
    real = sorted(
        root / n for n in ["b.png", "a/x.jpg", "a/sub/y.PNG", "a-z.webp", "c.gif", "elsewhere/w.jpeg"]
    )
    assert got == [*real, root / "0-out" / "o.png"]
    assert sorted((i.path.name, i.reason) for i in ignored) == [
        ("again", REPEATED_FOLDER),
        ("loop", REPEATED_FOLDER),
        ("notes.txt", ".txt"),
    ]

    errors: list[OSError] = []
    assert list(iter_image_files(root / "b.png", on_error=errors.append)) == []
    assert len(errors) == 1 and isinstance(errors[0], NotADirectoryError)
    with pytest.raises(NotADirectoryError):
        list(iter_image_files(root / "b.png"))


def test_a_class_folder_named_in_another_encoding_is_refused_before_training(make_folder, tmp_path) -> None:
    """Linux names are bytes: ``caf\\xe9`` (Latin-1) once trained a whole epoch, then crashed at the export."""
    from typer.testing import CliRunner

    from ftsgd.cli.app import app

    root = make_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    for split in ("train", "val"):
        os.rename(root / split / "b", os.fsencode(root / split) + b"/caf\xe9")
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--out", str(out), "--model", "test_vit", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--set", "model.kwargs={img_size=32}"])
    assert result.exit_code == 2, result.output
    assert "folder name(s) 'caf\\xe9' are not valid UTF-8" in result.output
    assert "Traceback" not in result.output and not out.exists()
