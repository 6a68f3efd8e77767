"""The two dataset layouts, and the split ftsgd draws from one folder of class folders.

A dataset is either

* **split folders**: ``<root>/train/<class>/<image>``, ``<root>/val/<class>/<image>`` and optionally more
  evaluation splits (``<root>/ood/<class>/<image>``), read by :func:`ftsgd.data.folders.discover_splits`; or
* **one folder of class folders**: ``<root>/<class>/<image>``, with no ``train/``. ftsgd holds out
  ``data.val_fraction`` of each class for validation (and ``data.test_fraction`` for a ``test`` split),
  drawn from ``data.split_seed`` alone: stratified, every class in every split, the same split for every run
  of a sweep (whatever their ``train.seed``).

A drawn split is recorded in the run directory (:func:`split_record`, every file with its size and
modification time) and is the single truth from then on: a resumed run and ``ftsgd eval RUN --split val``
read the record (:func:`splits_from_record`), never draw again, so images added to the folder later can
never move into the validation split of a run that trained on them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftsgd.data.folders import (
    Split,
    _evaluation_split_dirs,
    _load_split,
    _resolve,
    _shorten,
    discover_splits,
    find_classes,
    is_image_file,
)
from ftsgd.errors import DataError, RecipeError
from ftsgd.recipe.schema import AGGREGATE_SPLITS, DataConfig

__all__ = [
    "LAYOUTS",
    "SPLIT_KEYS",
    "check_split_keys",
    "find_splits",
    "is_one_folder",
    "split_lines",
    "split_record",
    "splits_from_record",
]

SPLIT_FORMAT = 1

SPLIT_KEYS = ("val_fraction", "test_fraction", "split_seed")
"""The ``data.*`` keys a drawn split is a function of (with the files): recorded, and compared on resume."""

TEST_SPLIT = "test"
"""The name of the held-out test split drawn with ``data.test_fraction``."""

LAYOUTS = (
    "ftsgd reads two dataset layouts:\n"
    "  1. split folders: <root>/train/<class>/<image>, <root>/val/<class>/<image>, and optionally more "
    "evaluation splits such as <root>/ood/<class>/<image>;\n"
    "  2. one folder of class folders: <root>/<class>/<image> (no train/): ftsgd holds out "
    "data.val_fraction (default 0.1) of each class for validation, and data.test_fraction for a test split"
)
"""The accepted layouts, for the message about a folder that is neither."""


def _direct_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file itself (not only in sub-folders); stops at the first."""
    try:
        with os.scandir(folder) as entries:
            return any(not e.name.startswith(".") and is_image_file(e.name) and e.is_file() for e in entries)
    except OSError:
        return False


def is_one_folder(cfg: DataConfig, *, strict: bool = True) -> bool:
    """Whether ``data.root`` is one folder of class folders: no train split folder, class folders with images.

    Args:
        cfg: The data section.
        strict: Refuse a folder of neither layout; False answers False for it (``ftsgd eval`` reads
            evaluation split folders without a train/).

    Raises:
        DataError: ``strict``, and ``data.root`` has no train split folder and no class folder holding images
            either (the message lists the accepted layouts).
    """
    root = Path(cfg.root).expanduser()
    if not cfg.root or not root.is_dir() or _resolve(root, cfg.train).is_dir():
        return False
    if cfg.train != DataConfig.train:
        return False  # an explicit data.train that is missing: discover_splits names it
    if any(_direct_images(root / c) for c in find_classes(root)):
        return True
    if not strict:
        return False
    loose = [f for f in os.listdir(root) if is_image_file(f)]
    what = (
        f"it holds {len(loose)} image(s) directly, not in class folders"
        if loose
        else "it has neither a train/ folder nor class folders holding images"
    )
    raise DataError(f"dataset folder {root} is not a dataset: {what}.\n{LAYOUTS}")


def _loose_class_folders(cfg: DataConfig) -> None:
    """Refuse class folders beside ``train/``: whether they belong to train or are a split is not guessed."""
    root = Path(cfg.root).expanduser()
    if not cfg.root or not root.is_dir():
        return
    loose = [c for c in find_classes(root) if _direct_images(root / c)]
    if loose:
        raise DataError(
            f"dataset folder {root} has a train/ split folder and also folder(s) holding images directly: "
            f"{_shorten(loose)}. They look like class folders, but split folders hold class folders. Move "
            "them into train/ (or the split they belong to), or remove them; a dataset is either split folders "
            f"or one folder of class folders, never both.\n{LAYOUTS}"
        )


def find_splits(
    cfg: DataConfig, class_names: list[str] | None = None, recorded: Mapping[str, Any] | None = None
) -> tuple[list[str], dict[str, Split]]:
    """The dataset's classes and splits, in either layout (see the module docstring).

    Args:
        cfg: The recipe's data section.
        class_names: The model's class list to label against (``ftsgd eval``), else the dataset's.
        recorded: A run's split record (:func:`split_record`): for one folder of class folders, the
            splits are read from it instead of drawn.

    Returns:
        As :func:`discover_splits`: ``(classes, {"train", "val", ("test",) extra evaluation splits})``.

    Raises:
        DataError: Neither layout, an unusable folder, or a class too small to split;
        RecipeError: split keys that differ from the record's.
    """
    if not is_one_folder(cfg, strict=class_names is None):
        if cfg.root and _resolve(Path(cfg.root).expanduser(), cfg.train).is_dir():
            _loose_class_folders(cfg)
        classes, splits = discover_splits(cfg, class_names)
        _check_split_names(splits)
        return classes, splits
    root = Path(cfg.root).expanduser()
    if recorded is not None:
        if class_names is None:  # a run resumed; ftsgd eval reads the record as it is
            check_split_keys(recorded, cfg)
        classes, splits = splits_from_record(recorded, root, class_names)
    else:
        classes, splits = _draw(cfg, root, class_names)
    splits.update(_named_evaluation_splits(cfg, root, classes, splits))
    return classes, splits


def _check_split_names(splits: Mapping[str, Split]) -> None:
    """``worst`` and ``mean`` name the aggregates over the evaluation splits; a split folder cannot take them."""
    taken = [f"{s.root} ({name!r})" for name, s in splits.items() if name in AGGREGATE_SPLITS]
    if taken:
        raise DataError(
            f"split folder(s) {', '.join(taken)}: {' and '.join(AGGREGATE_SPLITS)} name the aggregates over the "
            "evaluation splits (worst.accuracy, mean.macro_f1); rename the folder(s)"
        )


def _draw(cfg: DataConfig, root: Path, class_names: list[str] | None) -> tuple[list[str], dict[str, Split]]:
    """Read every class folder of ``root`` and draw the stratified split."""
    classes = list(class_names) if class_names is not None else find_classes(root)
    if class_names is None and len(classes) < 2:
        raise DataError(
            f"dataset folder {root} has a single class folder ({classes[0]!r}); a classifier needs at least "
            "two classes, one sub-folder each"
        )
    whole = _load_split("dataset", root, {c: i for i, c in enumerate(classes)}, f"the dataset ({root})")
    by_class: dict[int, list[Path]] = {}
    for path, label in whole.samples:
        by_class.setdefault(label, []).append(path)
    drawn = draw_split({classes[k]: v for k, v in by_class.items()}, cfg)
    idx = {c: i for i, c in enumerate(classes)}
    splits = {
        name: Split(
            name=name,
            root=root,
            samples=tuple((p, idx[c]) for c, paths in files.items() for p in paths),
            classes=tuple(c for c in files if files[c]),
            ignored=whole.ignored if name == "train" else (),
            drawn=True,
        )
        for name, files in drawn.items()
    }
    return classes, splits


def draw_split(files: Mapping[str, list[Path]], cfg: DataConfig) -> dict[str, dict[str, list[Path]]]:
    """Hold out ``data.val_fraction`` (and ``data.test_fraction``) of each class, from ``data.split_seed``.

    Each class's files are ordered by name and shuffled by a generator seeded with the seed and the
    class name, so a class's split does not depend on the other classes. Per class, validation gets
    ``round(n * val_fraction)`` images and test ``round(n * test_fraction)``, each at least one, and
    training at least one.

    Args:
        files: Class name -> its image files.
        cfg: The data section (``val_fraction``, ``test_fraction``, ``split_seed``).

    Returns:
        ``{"train": {class: files}, "val": {...}, ("test": {...})}``, each class's files sorted.

    Raises:
        DataError: Classes too small to split, each named with its count.
    """
    wants = [("val", cfg.val_fraction)] + ([(TEST_SPLIT, cfg.test_fraction)] if cfg.test_fraction else [])
    out: dict[str, dict[str, list[Path]]] = {"train": {}, **{name: {} for name, _ in wants}}
    small = []
    for cls, paths in files.items():
        counts = [max(1, int(len(paths) * fraction + 0.5)) for _, fraction in wants]
        if len(paths) - sum(counts) < 1:
            small.append(f"{cls!r} ({len(paths)} image{'s' if len(paths) != 1 else ''})")
            continue
        order = sorted(paths)
        random.Random(f"{cfg.split_seed}:{cls}").shuffle(order)
        start = 0
        for (name, _), count in zip(wants, counts, strict=True):
            out[name][cls] = sorted(order[start : start + count])
            start += count
        out["train"][cls] = sorted(order[start:])
    if small:
        into = " and ".join(["train", *(name for name, _ in wants)])
        raise DataError(
            f"class(es) too small to split into {into} (each needs at least {len(wants) + 1} images: one for "
            f"every split): {', '.join(small)}. Add images, remove the class folder(s), or give the dataset "
            "as split folders (train/, val/)"
        )
    return out


def _named_evaluation_splits(
    cfg: DataConfig, root: Path, classes: list[str], splits: dict[str, Split]
) -> dict[str, Split]:
    """``data.eval_splits`` folders evaluated beside a drawn split (none are discovered: root holds classes)."""
    if not cfg.eval_splits:
        return {}
    problems: list[str] = []
    idx = {c: i for i, c in enumerate(classes)}
    out = {}
    for name, path in _evaluation_split_dirs(root, cfg, [], problems):
        if name in splits:
            problems.append(
                f"evaluation split {path} is named {name!r} like a drawn split; rename its folder"
            )
            continue
        out[name] = _load_split(name, path, idx, "the dataset's class folders")
    _check_split_names(out)
    if problems:
        raise DataError("; ".join(problems))
    return out


def split_keys(cfg: DataConfig) -> dict[str, Any]:
    """The values of :data:`SPLIT_KEYS` in ``cfg``."""
    return {key: getattr(cfg, key) for key in SPLIT_KEYS}


def split_record(cfg: DataConfig, classes: list[str], splits: Mapping[str, Split]) -> dict[str, Any] | None:
    """The record of a drawn split, for the run directory; None when the dataset came as split folders.

    Every file is listed relative to the dataset folder with its size and modification time, so the record
    is still valid when the dataset moves, and says exactly which file changed when one does.
    """
    drawn = {name: s for name, s in splits.items() if s.drawn}
    if not drawn:
        return None
    rows: dict[str, list[list[Any]]] = {}
    for name, split in drawn.items():
        rows[name] = []
        for path, _ in split.samples:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            rows[name].append([path.relative_to(split.root).as_posix(), size, mtime])
    return {"format": SPLIT_FORMAT, "keys": split_keys(cfg), "classes": list(classes), "splits": rows}


def check_split_keys(recorded: Mapping[str, Any], cfg: DataConfig) -> None:
    """Refuse split keys that differ from those the recorded split was drawn with (exit 2, naming them)."""
    keys = recorded.get("keys") if isinstance(recorded.get("keys"), dict) else {}
    differing = [
        f"data.{key}: the run's split was drawn with {keys.get(key)!r}, this command gives {value!r}"
        for key, value in split_keys(cfg).items()
        if keys.get(key) != value
    ]
    if differing:
        differing.append(
            "a run keeps the split it started with; use the run's own values, or start a new run (--out) "
            "to draw another split"
        )
        raise RecipeError(differing)


def splits_from_record(
    recorded: Mapping[str, Any], root: Path, class_names: list[str] | None = None
) -> tuple[list[str], dict[str, Split]]:
    """The splits exactly as a run recorded them, with files under ``root`` (the dataset may have moved).

    Images added to the folder since are in no split: a run keeps the images it validated on (a resumed
    run's fingerprint check reports files changed or removed since).

    Raises:
        DataError: A record that is not a split record, or that names a class the model lacks.
    """
    try:
        own = [str(c) for c in recorded["classes"]]
        rows = {str(name): [str(r[0]) for r in files] for name, files in recorded["splits"].items()}
    except (KeyError, TypeError, IndexError, AttributeError):
        raise DataError("the run's split record is not one ftsgd wrote (no classes or splits)") from None
    classes = list(class_names) if class_names is not None else own
    idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted({rel.split("/")[0] for files in rows.values() for rel in files} - set(idx))
    if unknown:
        raise DataError(f"the run's recorded split has class(es) the model lacks: {_shorten(unknown)}")
    splits = {}
    for name, files in rows.items():
        samples = tuple((root / rel, idx[rel.split("/")[0]]) for rel in files)
        present = tuple(sorted({rel.split("/")[0] for rel in files}))
        splits[name] = Split(name=name, root=root, samples=samples, classes=present, drawn=True)
    return classes, splits


def split_lines(classes: list[str], splits: Mapping[str, Split], cfg: DataConfig) -> list[str]:
    """A human description of the splits: the layout, then each split's images per class."""
    drawn = any(s.drawn for s in splits.values())
    if drawn:
        keys = ", ".join(f"data.{k} = {v}" for k, v in split_keys(cfg).items())
        lines = [f"one folder of class folders, split by ftsgd ({keys})"]
    else:
        lines = ["split folders"]
    for name, split in splits.items():
        counts = [0] * len(classes)
        for _, label in split.samples:
            counts[label] += 1
        shown = _shorten([f"{c} {n}" for c, n in zip(classes, counts, strict=True)])
        lines.append(f"{name}: {len(split)} images ({shown})")
    return lines
