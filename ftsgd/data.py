"""Image-folder splits, transforms and deterministic, resumable data loaders.

A dataset is a folder ``root`` holding ``train/`` and ``val/`` in the image-folder layout (one
sub-folder per class, images inside, nested folders allowed). Every other sub-folder with that layout
(``ood/``, ``test/``, ...) is an extra evaluation split, because measuring accuracy under distribution
shift is the point of the method; ``data.eval_splits`` lists them explicitly instead.

Determinism is designed for exact resume: the sample order of an epoch is a permutation drawn from
``(seed, epoch)`` alone, and the random augmentation of sample ``i`` in epoch ``e`` is drawn from RNGs
seeded by ``(seed, e, i)`` alone. So an epoch resumed at batch ``k`` yields exactly the batches the
uninterrupted run would have seen, whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from ftsgd import scancache
from ftsgd.distributed import gather_objects
from ftsgd.errors import DataError
from ftsgd.recipe import AUGMENTS, BAD_IMAGE_ACTIONS, DataConfig

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".jpe",
    ".png",
    ".gif",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
) + ((".avif",) if features.check_module("avif") else ())
"""File extensions read as images (compared case-insensitively).

torchvision's ImageFolder list (jpg, jpeg, png, bmp, webp, tif, tiff, ppm, pgm) plus what a folder of
images collected from the web or a phone also holds and PIL decodes in every standard build: GIF (its
first frame, as for any multi-frame file), the JPEG spellings ``.jfif``/``.jpe``, the rest of the
netpbm family, and AVIF where this PIL build reads it. Anything else in a class folder is left out
and counted (see :func:`ignored_warnings`), never dropped silently.
"""

NO_EXTENSION = "no extension"
""":attr:`IgnoredFile.reason` of a file whose name has no extension."""

OUTSIDE_CLASS = "outside a class folder"
""":attr:`IgnoredFile.reason` of a file directly in a split folder, where it has no class."""

REPEATED_FOLDER = "folder already read"
""":attr:`IgnoredFile.reason` of a folder link that leads to a folder already read in the split."""


LAYOUT_HINT = (
    "expected layout: <root>/train/<class>/<image>, <root>/val/<class>/<image>, and optionally more "
    "evaluation splits such as <root>/ood/<class>/<image>"
)


@dataclass(frozen=True)
class IgnoredFile:
    """A file in a split that is not taken as an image, or a folder link not followed twice.

    Attributes:
        path: The file, or the link that leads back to a folder already read.
        reason: The group it is reported in: the lower-case extension (``.txt``), :data:`NO_EXTENSION`,
            :data:`OUTSIDE_CLASS` or :data:`REPEATED_FOLDER`.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class Split:
    """One split of an image-folder dataset.

    Attributes:
        name: Split name used in logs and metrics (``train``, ``val``, or the folder name).
        root: The split's folder.
        samples: ``(file, label)`` pairs in a stable order; ``label`` indexes the *train* class list,
            so the same class has the same label in every split even when a split lacks some classes.
        classes: The class folder names present in this split, sorted.
    """

    name: str
    root: Path
    samples: tuple[tuple[Path, int], ...]
    classes: tuple[str, ...]
    ignored: tuple[IgnoredFile, ...] = ()
    """What discovery left out of this split and why (hidden files aside), for :func:`ignored_warnings`."""

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------- discovery


def _is_hidden(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store and friends are never classes or images.
    return name.startswith(".")


def is_image_file(path: Path | str) -> bool:
    """Return whether ``path`` has one of the :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)


def find_classes(split_dir: Path) -> list[str]:
    """Return the sorted class folder names of a split (hidden folders are ignored).

    Args:
        split_dir: A split folder in the image-folder layout.

    Returns:
        Sorted names of the non-hidden sub-folders.
    """
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


_IMAGE, _OTHER, _REPEAT, _CLASH = "image", "other", "repeat", "clash"
"""What :func:`_walk_class` found: an image, another file, a folder read before by the same class
folder (or the split folder or one above it: a loop), or one read before by another class folder."""

_DirId = tuple[int, int]
_Owners = dict[_DirId, tuple[str, Path]]
"""``(st_dev, st_ino)`` of each folder read in a split -> (class that read it, path it was read at);
the split folder and its ancestors are owned by ``""``."""


def _dir_id(path: Path) -> _DirId:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read folder {path}: {exc.strerror or exc}") from None
    return st.st_dev, st.st_ino


def _split_owners(split_dir: Path) -> _Owners:
    """The owners map of a split before any class is read: the split folder and every folder above it.

    A link to any of them from inside a class folder is a loop, whatever class reads it first.
    """
    real = split_dir.resolve()
    return {_dir_id(p): ("", p) for p in (real, *real.parents)}


def _walk_class(class_dir: Path, owners: _Owners) -> Iterator[tuple[str, Path, tuple[str, Path] | None]]:
    """Walk one class folder, following links, but reading each real folder of the split only once.

    ``os.walk(followlinks=True)`` re-reads a folder every time a link leads to it, so a link loop
    multiplies images (a ``loop -> ..`` link turned 24 images into 984, most of them mislabelled)
    until the OS refuses a path too deep. Folders are identified by ``(st_dev, st_ino)``, which
    sees through any number of links.

    Args:
        class_dir: ``<split>/<class>``.
        owners: Folders read so far in this split (updated); see :data:`_Owners`.

    Yields:
        ``(kind, path, first)``: ``kind`` is ``_IMAGE``/``_OTHER`` for a file (not hidden),
        ``_REPEAT``/``_CLASH`` for a folder read before, with ``first`` its owner and path then.
        Real folders depth-first, each folder's entries in sorted order, then the folders that
        links lead to (so a folder is read at its real path when it has one in the class folder).
    """
    name = class_dir.name
    stack, links = [class_dir], []
    while stack or links:
        # Real sub-folders first, links after, so a folder is read at its own path, not a link's.
        folder = stack.pop() if stack else links.pop(0)
        key = _dir_id(folder)
        first = owners.get(key)
        if first is not None:
            yield (_REPEAT if first[0] in ("", name) else _CLASH), folder, first
            continue
        owners[key] = (name, folder)
        try:
            entries = sorted(os.scandir(folder), key=_entry_name)
        except OSError as exc:
            raise DataError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
        subdirs: list[Path] = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():  # follows links; a dangling link is a file (and an unreadable image)
                (links if entry.is_symlink() else subdirs).append(Path(entry.path))
            else:
                yield (_IMAGE if is_image_file(entry.name) else _OTHER), Path(entry.path), None
        stack.extend(reversed(subdirs))


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _ignore_reason(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix or NO_EXTENSION


def _read_class(class_dir: Path, owners: _Owners) -> tuple[list[Path], list[IgnoredFile], list[str]]:
    """The images of one class folder (sorted), the files left out, and label clashes as messages."""
    images: list[Path] = []
    ignored: list[IgnoredFile] = []
    clashes: list[str] = []
    for kind, path, first in _walk_class(class_dir, owners):
        if kind == _IMAGE:
            images.append(path)
        elif kind == _OTHER:
            ignored.append(IgnoredFile(path, _ignore_reason(path.name)))
        elif kind == _REPEAT:
            ignored.append(IgnoredFile(path, REPEATED_FOLDER))
        else:
            assert first is not None
            clashes.append(
                f"{path} and {first[1]} are the same folder, reached from class folders {first[0]!r} and "
                f"{class_dir.name!r}, so its images would be labelled as both. Remove the link "
                "(links are followed, but a folder belongs to one class)"
            )
    return sorted(images), ignored, clashes


def iter_image_files(
    folder: Path | str,
    on_error: Callable[[OSError], None] | None = None,
    on_ignored: Callable[[IgnoredFile], None] | None = None,
) -> Iterator[Path]:
    """The image files under ``folder``, lazily and in a stable order, by the rules of a class folder.

    The streaming sibling of the split listing (``ftsgd predict`` walks folders of any size with it):
    :data:`IMG_EXTENSIONS`, hidden files and folders skipped, links followed but each real folder read
    once (a link loop, a link to a folder above ``folder`` or a second way to a folder adds nothing),
    real sub-folders before the folders links lead to. Each folder is listed and sorted only when the
    walk reaches it and its files and real sub-folders are visited in name order, so memory grows with
    the largest single folder and the number of folders, never with the number of files.

    Args:
        folder: The folder to walk.
        on_error: Called with the ``OSError`` of a folder that cannot be listed, after which the walk
            goes on (like ``os.walk``'s ``onerror``); without it the error is raised.
        on_ignored: Called with each file left out because it is not an image by its extension, and each
            folder link not followed because its folder was already read (see :class:`IgnoredFile`).
    """
    start = Path(folder)
    try:
        read = {_dir_id(p) for p in start.resolve().parents}  # a link to any of them is a loop
    except DataError:
        read = set()
    links = [start]
    while links:
        yield from _walk_real(links.pop(0), read, links, on_error, on_ignored)


def _walk_real(
    folder: Path,
    read: set[_DirId],
    links: list[Path],
    on_error: Callable[[OSError], None] | None,
    on_ignored: Callable[[IgnoredFile], None] | None,
) -> Iterator[Path]:
    """One folder of :func:`iter_image_files` and its real sub-folders; links to folders are queued."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in read:
            if on_ignored is not None:
                on_ignored(IgnoredFile(folder, REPEATED_FOLDER))
            return
        entries = sorted(os.scandir(folder), key=_entry_name)
    except OSError as exc:
        if on_error is None:
            raise
        on_error(exc)
        return
    read.add((st.st_dev, st.st_ino))
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():  # follows links; a dangling link is a file (and an unreadable image)
            if entry.is_symlink():
                links.append(Path(entry.path))
            else:
                yield from _walk_real(Path(entry.path), read, links, on_error, on_ignored)
        elif is_image_file(entry.name):
            yield Path(entry.path)
        elif on_ignored is not None:
            on_ignored(IgnoredFile(Path(entry.path), _ignore_reason(entry.name)))


def _has_image_folder_layout(folder: Path) -> bool:
    """Cheaply decide whether ``folder`` looks like a split: a class sub-folder holding an image.

    Stops at the first image found so discovery stays fast on large datasets.
    """
    owners = _split_owners(folder)
    for class_dir in find_classes(folder):
        if any(kind == _IMAGE for kind, _, _ in _walk_class(folder / class_dir, owners)):
            return True
    return False


def _resolve(root: Path, entry: str) -> Path:
    """A split given as a folder name under ``root`` or as an absolute (or ``~``) path."""
    path = Path(entry).expanduser()
    return path if path.is_absolute() else root / path


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _shorten(items: list[str], limit: int = 20) -> str:
    """Comma-join at most ``limit`` items, so a 1000-class dataset does not flood the terminal."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _load_split(
    name: str, split_dir: Path, class_to_idx: dict[str, int], known: str, *, discovered: bool = False
) -> Split:
    """Read one split folder, map its classes to train labels by name and check it is usable.

    Args:
        name: Split name for messages.
        split_dir: The split's folder (must exist).
        class_to_idx: Class name -> label, from the train split or the model's metadata.
        known: Where the class list came from, for the mismatch message.
        discovered: The split was found automatically (not named by the user), so the message also
            says how to leave it out.
    """
    if not split_dir.is_dir():
        raise DataError(f"{name} split: {split_dir} is not a folder; {LAYOUT_HINT}")
    classes = find_classes(split_dir)
    if not classes:
        loose = [f for f in os.listdir(split_dir) if is_image_file(f)]
        why = (
            f"it holds {len(loose)} image(s) directly instead of one sub-folder per class"
            if loose
            else "it has no class sub-folders"
        )
        raise DataError(
            f"{name} split {split_dir} is empty: {why}. Put each class's images in their own "
            f"sub-folder, e.g. {split_dir}/<class>/<image>; {LAYOUT_HINT}"
        )
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        shown = _shorten([repr(c) for c in unknown])
        skip = (
            f" If {split_dir.name}/ is not an evaluation split, list the splits to evaluate in "
            "data.eval_splits instead of relying on auto-discovery."
            if discovered
            else ""
        )
        raise DataError(
            f"{name} split {split_dir} has {len(unknown)} class folder(s) that {known} lacks: {shown}. "
            f"Known classes: {_shorten(list(class_to_idx))}. Rename or remove those folders.{skip}"
        )
    samples, ignored = _read_split(name, split_dir, classes, class_to_idx)
    return Split(
        name=name, root=split_dir, samples=tuple(samples), classes=tuple(classes), ignored=tuple(ignored)
    )


def _read_split(
    name: str, split_dir: Path, classes: list[str], class_to_idx: dict[str, int]
) -> tuple[list[tuple[Path, int]], list[IgnoredFile]]:
    """The ``(image, label)`` samples of a split's class folders and the files left out.

    Raises:
        DataError: A folder reached from two class folders, or a class folder without images (the
            message counts the files there that are not read as images, e.g. HEIC photos).
    """
    owners = _split_owners(split_dir)
    samples: list[tuple[Path, int]] = []
    ignored = [
        IgnoredFile(Path(e.path), OUTSIDE_CLASS)
        for e in sorted(os.scandir(split_dir), key=_entry_name)
        if not _is_hidden(e.name) and not e.is_dir()
    ]
    empty: list[str] = []
    clashes: list[str] = []
    for c in classes:
        files, left_out, clash = _read_class(split_dir / c, owners)
        ignored.extend(left_out)
        clashes.extend(clash)
        if not files:
            empty.append(c + _left_out_summary([i for i in left_out if i.reason != REPEATED_FOLDER]))
        samples.extend((f, class_to_idx[c]) for f in files)
    if clashes:
        more = f" ({len(clashes) - 1} more such folder(s))" if len(clashes) > 1 else ""
        raise DataError(f"{name} split {split_dir}: {clashes[0]}{more}")
    if empty:
        raise DataError(
            f"{name} split {split_dir}: class folder(s) without images: {', '.join(empty)}. "
            f"Add images ({', '.join(IMG_EXTENSIONS)}) or remove the empty folder(s)."
        )
    return samples, ignored


def _left_out_summary(ignored: list[IgnoredFile]) -> str:
    """`` (it holds 3 files that are not read as images: 2 .heic, 1 without extension)``, or ``""``."""
    if not ignored:
        return ""
    counts: dict[str, int] = {}
    for item in ignored:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    parts = ", ".join(
        f"{n} {'without extension' if reason == NO_EXTENSION else reason}"
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return f" (it holds {len(ignored)} file(s) that are not read as images: {parts})"


def discover_splits(
    cfg: DataConfig, class_names: list[str] | None = None
) -> tuple[list[str], dict[str, Split]]:
    """Find the train, validation and extra evaluation splits of a dataset folder.

    Args:
        cfg: The recipe's data section: ``root``, ``train``, ``val`` and ``eval_splits`` are used.
            ``train``, ``val`` and ``eval_splits`` entries are folder names under ``root`` or
            absolute paths.
        class_names: The class list to label against (``ftsgd eval`` passes the model's classes from
            its metadata). Folders are matched to it by name, so a dataset whose folders sort
            differently still gets the labels the model was trained with. Without it, the classes
            are the sorted folder names of the train split.

    Returns:
        ``(classes, splits)``: the class list and the splits keyed by name: ``"train"``, ``"val"``,
        then the extra evaluation splits keyed by folder name, in sorted (auto-discovered) or given
        order. With ``class_names``, a missing train or val folder is not an error (evaluating a
        trained model needs no training data); that split is just absent from the dict.

    Raises:
        DataError: Missing root/train/val, a train split with fewer than two classes, a split whose
            class folder is not a known class, an empty split or class folder, a folder reached
            (through links) from two class folders, two evaluation splits with the same name, or an
            explicitly listed split that does not exist.

    Links are followed, but each real folder is read once per split (identified by device and inode),
    so a link loop or two links to one folder cannot repeat or relabel images; a link to a file is
    taken as a file of the folder it is in. Files that are not images by their extension, files
    directly in a split folder and links to folders already read are left out and recorded in
    :attr:`Split.ignored`: show them with :func:`ignored_warnings`.
    """
    if not cfg.root:
        raise DataError(f"no dataset folder given: pass --data DIR (or set data.root); {LAYOUT_HINT}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"dataset folder {root} {what}; {LAYOUT_HINT}")

    eval_mode = class_names is not None
    train_dir, val_dir = _resolve(root, cfg.train), _resolve(root, cfg.val)
    problems: list[str] = []
    for key, path in (("train", train_dir), ("val", val_dir)):
        if not eval_mode and not path.is_dir():
            problems.append(f"{key} split folder {path} does not exist (data.{key} = {getattr(cfg, key)!r})")
    if problems:
        raise _data_problems(problems, root, hint=LAYOUT_HINT)

    classes, known = _class_list(class_names, train_dir, problems)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    splits: dict[str, Split] = {}
    taken: list[Path] = []
    for key, path in (("train", train_dir), ("val", val_dir)):
        if path.is_dir():
            try:
                splits[key] = _load_split(key, path, class_to_idx, known)
            except DataError as exc:  # keep going: report every split's problems at once
                problems.append(str(exc))
            taken.append(path)

    discovered = not cfg.eval_splits
    for name, path in _evaluation_split_dirs(root, cfg, taken, problems):
        if any(_same_dir(path, t) for t in taken):
            continue  # e.g. eval_splits = ["val", "ood"]: val is evaluated anyway
        if name in splits:
            problems.append(
                f"two splits are both named {name!r}: {splits[name].root} and {path}. "
                "Split names label the metrics, so give the folders different names."
            )
            continue
        try:
            splits[name] = _load_split(name, path, class_to_idx, known, discovered=discovered)
        except DataError as exc:
            problems.append(str(exc))
        taken.append(path)

    if problems:
        raise _data_problems(problems, root)
    if not splits:
        raise DataError(f"no splits found under {root}; {LAYOUT_HINT}")
    return classes, splits


def _class_list(class_names: list[str] | None, train_dir: Path, problems: list[str]) -> tuple[list[str], str]:
    """The classes to label against, and where they came from (for messages)."""
    if class_names is not None:
        if not class_names:
            raise DataError("the model's class list is empty; its metadata is missing or damaged")
        return list(class_names), "the model's class list"
    classes = find_classes(train_dir)
    known = f"the train split ({train_dir})"
    if not classes:
        # Let _load_split explain (loose images vs. nothing at all).
        _load_split("train", train_dir, {}, known)
    if len(classes) == 1:
        # One class trains to a meaningless "100%": the model learns to give the only answer there is.
        problems.append(
            f"train split {train_dir} has a single class folder ({classes[0]!r}); a classifier needs "
            "at least two classes, one sub-folder of train/ each"
        )
    return classes, known


def _evaluation_split_dirs(
    root: Path, cfg: DataConfig, taken: list[Path], problems: list[str]
) -> list[tuple[str, Path]]:
    """``data.eval_splits`` as ``(name, folder)``, or every other folder under ``root`` shaped like a split."""
    extra: list[tuple[str, Path]] = []
    if cfg.eval_splits:
        for entry in cfg.eval_splits:
            path = _resolve(root, entry)
            if not path.is_dir():
                problems.append(f"evaluation split {entry!r} (data.eval_splits): {path} does not exist")
                continue
            extra.append((path.name, path))
        return extra
    for name in find_classes(root):  # sorted, non-hidden sub-folders
        path = root / name
        if not any(_same_dir(path, t) for t in taken) and _has_image_folder_layout(path):
            extra.append((name, path))
    return extra


def _data_problems(problems: list[str], root: Path, hint: str = "") -> DataError:
    """One error for all the problems found; a single problem keeps its own message."""
    tail = f"; {hint}" if hint else ""
    if len(problems) == 1:
        return DataError(problems[0] + tail)
    lines = "\n".join(f"  - {p}" for p in problems)
    return DataError(
        f"{len(problems)} problems with the dataset {root}:\n{lines}" + (f"\n{hint}" if hint else "")
    )


_SHOW_IGNORED = 3
"""How many example paths each group of ignored files lists."""

_RAW_EXTENSIONS = frozenset({".arw", ".cr2", ".cr3", ".dng", ".nef", ".orf", ".raf", ".rw2"})
"""Camera RAW extensions, which need developing rather than decoding (their hint says so)."""


def ignored_warnings(splits: dict[str, Split], root: Path | str | None = None) -> list[str]:
    """Warnings, in ftsgd's words, about what discovery left out of ``splits``.

    Both ``train`` and ``eval`` print them (on stderr, so ``--json`` output stays one object):
    a dataset whose GIFs, HEIC photos or extension-less files were silently skipped trains on less
    data than its owner thinks.

    Args:
        splits: The splits to report on (from :func:`discover_splits`, possibly after the scan).
        root: Dataset folder; paths are shown relative to it.

    Returns:
        Zero, one or two messages: files not read as images, grouped by reason with a count, a hint
        and a few examples; and folder links not followed because their folder was already read.
    """
    tally = IgnoredTally()
    for item in dict.fromkeys(i for split in splits.values() for i in split.ignored):
        tally.add(item)
    return tally.messages(root)


class IgnoredTally:
    """What a walk left out: a count and the first few examples per reason, so memory stays constant.

    :func:`ignored_warnings` reports a dataset's splits with it; ``ftsgd predict`` feeds it from
    :func:`iter_image_files` while it streams.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[Path]] = {}

    def add(self, item: IgnoredFile) -> None:
        """Count one file (or folder link) left out."""
        self.counts[item.reason] = self.counts.get(item.reason, 0) + 1
        shown = self.examples.setdefault(item.reason, [])
        if len(shown) < _SHOW_IGNORED:
            shown.append(item.path)

    def messages(self, root: Path | str | None = None, where: str = "in a class folder") -> list[str]:
        """The warnings: files not read as images (by reason, with a hint), then folder links not followed.

        Args:
            root: Paths are shown relative to it.
            where: Where the files were, for the first message's first line.
        """
        root = Path(root).expanduser() if root is not None else None
        files = {r: n for r, n in self.counts.items() if r != REPEATED_FOLDER}
        messages = []
        if files:
            lines = [f"ignored {sum(files.values())} file(s) that are not images {where}:"]
            for reason, n in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
                paths = self.examples[reason]
                examples = ", ".join(_shown(p, root) + _sniffed(p, reason) for p in paths)
                more = ", ..." if n > len(paths) else ""
                lines.append(f"  {_group_label(reason)} ({n}): {_ignore_hint(reason)}; e.g. {examples}{more}")
            messages.append("\n".join(lines))
        n_links = self.counts.get(REPEATED_FOLDER, 0)
        if n_links:
            links = self.examples[REPEATED_FOLDER]
            shown = ", ".join(f"{_shown(p, root)} -> {p.resolve()}" for p in links)
            more = ", ..." if n_links > len(links) else ""
            messages.append(
                f"did not follow {n_links} folder link(s) to a folder already read (a link loop, or a "
                f"second way to the same folder; each folder is read once): {shown}{more}"
            )
        return messages


def _shown(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def _group_label(reason: str) -> str:
    if reason == NO_EXTENSION:
        return "files without extension"
    if reason == OUTSIDE_CLASS:
        return "files outside any class folder"
    return f"{reason} files"


def _ignore_hint(reason: str) -> str:
    """Why files of this group are not read, and what to do if they should be."""
    if reason == NO_EXTENSION:
        return (
            "ftsgd recognises images by their extension (.jpg, .png, .gif, ...); rename those that are images"
        )
    if reason == OUTSIDE_CLASS:
        return "files directly in a split folder have no class; images belong in <split>/<class>/"
    if reason in (".heic", ".heif"):
        return (
            "PIL reads HEIC/HEIF photos only with the pillow-heif package, which ftsgd does not use; "
            "convert them to JPEG"
        )
    if reason in _RAW_EXTENSIONS:
        return "camera RAW files; export them as JPEG or PNG"
    if reason == ".svg":
        return "vector drawings; render them to PNG"
    if reason in Image.registered_extensions():
        return "an image type ftsgd does not read; convert them to PNG or JPEG"
    return "not an image type"


def _sniffed(path: Path, reason: str) -> str:
    """`` (a JPEG image)`` for an extension-less file whose content is an image, else ``""``."""
    if reason != NO_EXTENSION:
        return ""
    quiet_pil_warnings()
    try:
        with Image.open(path) as img:
            return f" (a {img.format} image)"
    except Exception:  # not an image, unreadable, a bomb: nothing to add to the example
        return ""


# --------------------------------------------------------------------------- image loading


def _to_uint8(arr: np.ndarray, bits16: bool) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 0..255.

    16-bit data is mapped linearly from its full 0..65535 range (dividing by 257 maps 65535 to 255
    exactly), so relative brightness between images is preserved; clipping would turn almost every
    16-bit image white. Float data in 0..1 is scaled by 255; anything else falls back to a per-image
    min-max stretch, the only option without knowing the sensor's range.
    """
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = np.nan_to_num(arr.astype(np.float64))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if bits16 or (lo >= 0 and 255 < hi <= 65535):
        out = arr / 257.0
    elif is_float and lo >= 0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0 and hi <= 255:
        out = arr
    else:
        out = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB.

    ``Image.convert("RGB")`` handles the 8-bit modes (L, LA, P, RGBA, CMYK, ...) but clips 16-bit
    and 32-bit greyscale ("I;16", "I", "F") instead of scaling, which turns typical 16-bit scans
    white; those are scaled to 8 bits first. Alpha is dropped as timm and torchvision do, so
    images look the same as in the pipelines the pretrained weights came from.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        return Image.fromarray(_to_uint8(arr, bits16=img.mode.startswith("I;16"))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
    return img.convert("RGB")


_PIL_FILTERS = [
    ("ignore", None, Image.DecompressionBombWarning, None, 0),
    ("ignore", None, UserWarning, re.compile(r"PIL\."), 0),
]
"""``warnings.filters`` entries that silence PIL's warnings about the files it decodes."""


def quiet_pil_warnings() -> None:
    """Keep PIL's warnings about decoded files off stderr; ftsgd words what matters itself.

    An image over PIL's decompression-bomb pixel limit is a ``too large`` bad image (see
    :func:`check_image`) instead of a raw ``DecompressionBombWarning`` line, and EXIF or palette
    quirks are handled (orientation applied, transparency converted) rather than printed. The filters
    go to the front of the process-wide list, once, and are put back there if something displaced
    them (a ``catch_warnings`` block that ended, ``-W error``): ``warnings.catch_warnings()``
    around each decode would swap the whole list, which is not thread-safe, and the pre-flight scan
    decodes in threads. Called by every function here that opens an image, so DataLoader workers
    are covered too.
    """
    if warnings.filters[: len(_PIL_FILTERS)] != _PIL_FILTERS:
        for _, _, category, module, _ in reversed(_PIL_FILTERS):
            warnings.filterwarnings("ignore", category=category, module=module.pattern if module else "")


def upright(img: Image.Image) -> Image.Image:
    """Turn a loaded image the way its EXIF orientation tag says, in place (the tag is then removed).

    Phone cameras store pixels as the sensor read them and record the rotation in EXIF; every viewer
    applies it, so an image that looks upright on screen must also be upright for the model (as in
    the datasets pretrained weights come from). Unparseable EXIF leaves the image as stored, as
    viewers do: the pixels are fine, only the metadata is damaged.
    """
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
            ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # damaged metadata must not cost the image
        pass
    return img


def load_image(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of multi-frame files), upright per its EXIF tag.

    Raises:
        DataError: The file cannot be decoded; the message names it.
    """
    quiet_pil_warnings()
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(upright(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc


# --------------------------------------------------------------------------- pre-flight scan


SKIPPED_FILE = "skipped.txt"
"""Run-directory file listing the images ``data.on_bad_image = "skip"`` left out (path, split, reason)."""

TRAIN_SKIP_HINT = (
    '--set data.on_bad_image=skip (data.on_bad_image = "skip" in the recipe); skipped files are listed in '
    "the run directory."
)
"""How ``ftsgd train`` leaves unreadable images out, for the pre-flight error."""
RACY_NS = 2_000_000_000
"""Files modified less than this long (2 s, FAT's timestamp resolution) before a scan are not cached."""

_SHOW_PER_KIND = 5
"""How many paths of each kind of problem a pre-flight error lists (then a count)."""


@dataclass(frozen=True)
class BadImage:
    """An image file the pre-flight scan could not decode.

    Attributes:
        path: The file.
        split: Name of the split it belongs to (the first one, if splits share files).
        kind: Short category: ``empty file``, ``truncated``, ``not an image``, ``unreadable`` or
            ``too large`` or ``corrupt``; problems are grouped by it in messages.
        detail: The decoder's or the OS's own words.
    """

    path: Path
    split: str
    kind: str
    detail: str


def check_image(path: Path | str) -> tuple[str, str] | None:
    """Decode ``path`` the way training will, cheaply; return ``(kind, detail)`` if that fails.

    ``Image.verify()`` alone misses truncated JPEGs, so the file is fully decoded: JPEGs at 1/8
    scale through ``draft()`` (libjpeg still reads every byte, so truncation and corrupt data are
    caught, at a fraction of the cost), everything else at full size, then converted to RGB as
    :func:`load_image` does so unusual modes are exercised too. About 0.4 ms per small image.

    An image over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89.5 million pixels)
    is ``too large``, like one over twice the limit that PIL refuses outright: decoding it at full
    size every epoch, for a model that sees a few hundred pixels, takes over 268 MB (as RGB) per
    image. PIL's own warning is never shown; the image is reported like any bad file and
    ``data.on_bad_image`` decides.
    """
    path = Path(path)
    quiet_pil_warnings()
    try:
        if os.stat(path).st_size == 0:
            return "empty file", "0 bytes"
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                return "too large", (
                    f"{img.width}x{img.height} = {img.width * img.height:,} pixels, over PIL's "
                    f"decompression-bomb limit of {limit:,}; downscale it"
                )
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb(upright(img))
    except UnidentifiedImageError:
        return "not an image", f"no known image format; it starts with {_head(path)}"
    except Image.DecompressionBombError as exc:
        return "too large", str(exc).split(", could be")[0]
    except OSError as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            return "truncated", text
        if exc.strerror and exc.filename is not None:
            return "unreadable", exc.strerror
        return "corrupt", text
    except Exception as exc:  # a damaged file can make a plugin fail in any way
        return "corrupt", f"{type(exc).__name__}: {exc}".rstrip(": ")
    return None


def _head(path: Path, n: int = 16) -> str:
    """The first bytes of a file, to recognise what it really is (an HTML error page, a text file)."""
    try:
        with open(path, "rb") as fh:
            return repr(fh.read(n))
    except OSError:
        return "(unreadable)"


_CHUNK = 64
"""Files per thread-pool task: one future per file would cost more than ``stat``-ing it."""


def _map_chunk(fn: Callable[..., Any], *columns: list[Any]) -> list[Any]:
    return list(map(fn, *columns))


def _map_threads(fn: Callable[..., Any], *iterables: list[Any], workers: int) -> list[Any]:
    """``list(map(fn, *iterables))``, in ``workers`` threads when there is more than one.

    The items go to the threads in chunks of up to :data:`_CHUNK` (``ThreadPoolExecutor.map`` ignores
    its ``chunksize``), so that cheap calls such as a ``stat`` are not dominated by the pool's overhead.
    """
    n = len(iterables[0])
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    workers = max(1, min(workers, n))
    if workers == 1:
        return list(map(fn, *iterables))
    chunk = max(1, min(_CHUNK, n // (4 * workers)))  # a few large images still spread over all threads
    with ThreadPoolExecutor(workers, thread_name_prefix="ftsgd-scan") as pool:
        futures = [
            pool.submit(_map_chunk, fn, *(col[i : i + chunk] for col in iterables))
            for i in range(0, n, chunk)
        ]
        return [r for f in futures for r in f.result()]


def scan_images(paths: Iterable[Path], *, workers: int = 0) -> dict[Path, tuple[str, str]]:
    """Check many files with :func:`check_image` in a thread pool.

    Decoding and file reads release the GIL, so threads overlap I/O (network file systems) and
    decompression of large images.

    Args:
        paths: Files to check (duplicates are checked once).
        workers: Threads; 0 = ``min(32, 4 x CPUs)``.

    Returns:
        ``{path: (kind, detail)}`` for the files that failed.
    """
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    results = _map_threads(check_image, unique, workers=workers)
    return {p: r for p, r in zip(unique, results, strict=True) if r is not None}


def _check_unless_cached(
    path: Path, cached: scancache.Entry | None, recent_ns: int
) -> tuple[scancache.Entry | None, tuple[str, str] | None]:
    """Decode ``path`` unless its ``(size, mtime_ns)`` equals ``cached`` (it decoded fine before).

    The file is ``stat``-ed *before* decoding, so a file changed while being decoded is recorded
    with its old key and decoded again next time.

    Args:
        path: The file.
        cached: Its cache entry, if any.
        recent_ns: Files modified at or after this time get no key: on a file system with coarse
            timestamps another write in the same tick would keep size and mtime ("racily clean"
            files, as git calls them), so they are decoded again next time.

    Returns:
        ``(key, failure)``: the file's ``(size, mtime_ns)`` (``None`` if it cannot be ``stat``-ed or
        is too recent to cache) and :func:`check_image`'s result (``None`` = good, also for a hit).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None, check_image(path)
    key = (st.st_size, st.st_mtime_ns)
    if key == cached:
        return key, None
    return (key if st.st_mtime_ns < recent_ns else None), check_image(path)


def _relative(path: str, prefix: str) -> str | None:
    """``path`` without ``prefix`` (a folder plus separator), or ``None`` if it is not under it."""
    return path[len(prefix) :] if path.startswith(prefix) else None


def scan_images_cached(
    roots: dict[Path, Path],
    directory: Path,
    *,
    workers: int = 0,
    shard: tuple[int, int] | None = None,
) -> dict[Path, tuple[str, str]]:
    """:func:`scan_images`, skipping files the scan cache knows as good and unchanged.

    Args:
        roots: Each file to check -> the split folder it belongs to (one cache file per folder).
        directory: The scan cache folder (:func:`ftsgd.scancache.scan_cache_dir`).
        workers: Threads; 0 = automatic.
        shard: ``(rank, world)`` in a multi-process job: each process checks every ``world``-th file,
            the results are gathered, and rank 0 alone writes the cache, with every process's files.

    Returns:
        ``{path: (kind, detail)}`` for the files that failed. Afterwards each folder's cache file
        holds exactly the files found good now (rewritten only if that changed).
    """
    prefixes = {root: str(root) + os.sep for root in dict.fromkeys(roots.values())}
    loaded = {root: scancache.load_entries(directory, root) for root in prefixes}
    paths = list(roots) if shard is None else list(roots)[shard[0] :: shard[1]]
    failed, good = _check_paths(paths, roots, prefixes, loaded, workers)
    if shard is not None:
        parts = gather_objects((failed, good))
        failed, good = {}, {root: {} for root in prefixes}
        for part_failed, part_good in parts:
            failed.update(part_failed)
            for root, entries in part_good.items():
                good[root].update(entries)
        if shard[0] != 0:
            return failed
    for root, entries in good.items():
        if entries != loaded[root]:
            scancache.store_entries(directory, root, entries)
        else:
            scancache.touch(directory, root)
    return failed


def _check_paths(
    paths: list[Path],
    roots: dict[Path, Path],
    prefixes: dict[Path, str],
    loaded: dict[Path, dict[str, scancache.Entry] | None],
    workers: int,
) -> tuple[dict[Path, tuple[str, str]], dict[Path, dict[str, scancache.Entry]]]:
    """Check ``paths`` against the loaded cache: the failures, and each folder's good files' entries."""
    # Entries are keyed relative to their folder; a path outside it (never made by discovery) is not cached.
    rels = [_relative(str(p), prefixes[roots[p]]) for p in paths]
    cached = [(loaded[roots[p]] or {}).get(rel) if rel else None for p, rel in zip(paths, rels, strict=True)]
    recent = [time.time_ns() - RACY_NS] * len(paths)
    results = _map_threads(_check_unless_cached, paths, cached, recent, workers=workers) if paths else []
    good: dict[Path, dict[str, scancache.Entry]] = {root: {} for root in prefixes}
    failed: dict[Path, tuple[str, str]] = {}
    for path, rel, (key, failure) in zip(paths, rels, results, strict=True):
        if failure is not None:
            failed[path] = failure
        elif key is not None and rel:
            good[roots[path]][rel] = key
    return failed, good


def _bad_image_report(bad: list[BadImage], checked: int, root: Path | None, action: str) -> str:
    by_kind: dict[str, list[BadImage]] = {}
    for b in bad:
        by_kind.setdefault(b.kind, []).append(b)
    where = f" under {root}" if root is not None else ""
    lines = [f"{len(bad)} of {checked} image files{where} cannot be read ({action}):"]
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {kind} ({len(items)}):")
        for b in items[:_SHOW_PER_KIND]:
            lines.append(f"    {_shown(b.path, root)}: {b.detail}")
        if len(items) > _SHOW_PER_KIND:
            lines.append(f"    ... and {len(items) - _SHOW_PER_KIND} more")
    return "\n".join(lines)


def preflight_scan(
    splits: dict[str, Split],
    *,
    on_bad_image: str = "error",
    root: Path | str | None = None,
    workers: int = 0,
    train_split: str | None = "train",
    shard: tuple[int, int] | None = None,
    skip_hint: str = TRAIN_SKIP_HINT,
    cache: bool = True,
) -> tuple[dict[str, Split], list[BadImage]]:
    """Decode every file of every split once, before any model is built, so bad data fails in seconds.

    Args:
        splits: From :func:`discover_splits`.
        on_bad_image: ``error``: any unreadable file is a :class:`DataError` listing them all
            (grouped by kind, the first few paths of each and a count). ``skip``: the files are
            dropped from their splits and returned, so the caller can list them.
        root: Dataset folder; paths in messages are shown relative to it.
        workers: Scan threads (0 = automatic).
        train_split: Key of the training split: with ``skip``, every one of its classes must keep at
            least one image (a class that is never trained on is not a usable task). ``None`` for
            evaluation-only scans.
        shard: ``(rank, world)`` in a multi-process job: each process decodes every ``world``-th file
            and the failures are gathered, so the job scans the dataset once, not once per process.
        skip_hint: How the calling command leaves bad files out, ending the error's advice (``ftsgd
            eval`` has ``--on-bad-image skip``, not the recipe key).
        cache: Skip files that decoded fine in an earlier scan and have not changed since (same
            absolute path, size and modification time), remembered in the scan cache
            (:mod:`ftsgd.scancache`; ``FTSGD_SCAN_CACHE=0`` turns it off). Reruns, resumes and sweeps
            then only ``stat`` an unchanged dataset instead of decoding it.

    Returns:
        ``(splits, skipped)``: the splits without the bad files (unchanged with ``error``) and the
        bad files, in split order.

    Raises:
        DataError: Bad files with ``on_bad_image = "error"``, or, with ``skip``, a split (or a
            training class) left with no images.
    """
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_ACTIONS)}, got {on_bad_image!r}")
    root = Path(root) if root is not None else None
    owner: dict[Path, str] = {}
    for name, split in splits.items():
        for path, _ in split.samples:
            owner.setdefault(path, name)
    directory = scancache.scan_cache_dir() if cache else None
    if directory is not None:
        roots = {p: splits[name].root for p, name in owner.items()}
        failed = scan_images_cached(roots, directory, workers=workers, shard=shard)
    elif shard is None:
        failed = scan_images(owner, workers=workers)
    else:
        rank, world = shard
        failed = {}
        for part in gather_objects(scan_images(list(owner)[rank::world], workers=workers)):
            failed.update(part)
    bad = [BadImage(path, owner[path], *failed[path]) for path in owner if path in failed]
    if not bad:
        return splits, []
    if on_bad_image == "error":
        report = _bad_image_report(bad, len(owner), root, "pre-flight scan")
        raise DataError(f"{report}\nFix or remove these files, or leave them out with {skip_hint}")
    kept: dict[str, Split] = {}
    problems: list[str] = []
    for name, split in splits.items():
        samples = tuple((p, label) for p, label in split.samples if p not in failed)
        dropped = len(split.samples) - len(samples)
        if not samples:
            problems.append(f"{name} split {split.root}: none of its {len(split.samples)} images can be read")
            continue
        present = sorted({p.relative_to(split.root).parts[0] for p, _ in samples})
        if name == train_split and dropped:
            lost = [c for c in split.classes if c not in present]
            if lost:
                problems.append(
                    f"{name} split {split.root}: no readable image left in class folder(s) {_shorten(lost)}"
                )
        kept[name] = replace(split, samples=samples, classes=tuple(present))
    if problems:
        report = _bad_image_report(bad, len(owner), root, 'data.on_bad_image = "skip"')
        raise DataError(
            "after skipping unreadable images the dataset is not usable:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n{report}"
        )
    return kept, bad


def skipped_lines(bad: list[BadImage]) -> str:
    """The contents of :data:`SKIPPED_FILE`: one ``path<TAB>split<TAB>kind: detail`` line per file."""
    return "".join(f"{b.path}\t{b.split}\t{b.kind}: {b.detail}\n" for b in bad)


# --------------------------------------------------------------------------- transforms


def _transform_kwargs(data_config: dict[str, Any]) -> dict[str, Any]:
    """Keep the data-config keys ``timm.data.create_transform`` accepts.

    A model's pretrained config can carry extra keys (``first_conv``, ``num_classes``, ...); passing
    them on would raise a TypeError deep inside timm.
    """
    from timm.data import create_transform

    accepted = set(inspect.signature(create_transform).parameters)
    return {k: v for k, v in data_config.items() if k in accepted and k != "is_training"}


TRIVIAL_AUGMENT = "rand-n1-m10-mstd101-inc1-p1"
"""timm's RandAugment configured as TrivialAugment: one operation per image (n1), always applied (p1), at a
magnitude drawn uniformly from 0 to the maximum (mstd > 100), with the operations that grow stronger with
the magnitude (inc1). ``data.auto_augment = "trivialaugment"`` stands for it."""


def timm_auto_augment(name: str) -> str | None:
    """``data.auto_augment`` as timm's ``auto_augment`` argument (None = off; "trivialaugment" expanded)."""
    if not name:
        return None
    return TRIVIAL_AUGMENT if name.lower() in ("trivialaugment", "trivial") else name


def train_transform_kwargs(data: DataConfig) -> dict[str, Any]:
    """The ``timm.data.create_transform`` training arguments that the ``data`` augmentation keys set.

    With every key at its default this is timm's random-resized crop (scale 0.08-1, ratio 3/4-4/3) and
    horizontal flip with colour jitter, auto-augment and random erasing off, as in the paper. Colour
    jitter 0 is passed as None: timm would otherwise add a no-op ColorJitter that still draws random
    numbers.
    """
    return {
        "scale": tuple(data.rrc_scale) or None,
        "ratio": tuple(data.rrc_ratio) or None,
        "hflip": data.hflip,
        "color_jitter": data.color_jitter or None,
        "auto_augment": timm_auto_augment(data.auto_augment),
        "re_prob": data.re_prob,
        "re_mode": data.re_mode,
        "re_count": data.re_count,
    }


def build_transform(
    data_config: dict[str, Any], augment: str, training: bool, data: DataConfig | None = None
) -> Callable[[Any], Any]:
    """Build the image -> normalised tensor transform for one split.

    Args:
        data_config: The model's timm data config (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``), e.g. from :func:`ftsgd.models.data_config_for`;
            normalising with the model's own statistics matters for fine-tuning pretrained weights.
        augment: The ``data.augment`` preset. ``rrc_flip``: timm's training transform (random-resized
            crop + horizontal flip; colour jitter, auto-augment and random erasing off, as in the
            paper, unless ``data`` turns them on). ``flip``: the eval transform (resize + centre crop)
            plus a random horizontal flip. ``none``: the eval transform.
        training: False gives the eval transform whatever ``augment`` says.
        data: The recipe's ``[data]`` section, whose augmentation keys refine the preset
            (:func:`train_transform_kwargs`); None keeps every key at its default.

    Returns:
        A callable turning a PIL RGB image into a CHW float tensor.
    """
    from timm.data import create_transform

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTS)}")
    data = data if data is not None else DataConfig()
    kwargs = _transform_kwargs(data_config)
    if training and augment == "rrc_flip":
        return create_transform(**kwargs, is_training=True, **train_transform_kwargs(data))
    eval_tf = create_transform(**kwargs, is_training=False)
    if training and augment == "flip":
        # Flipping the normalised tensor is the same as flipping the image before ToTensor.
        return T.Compose([eval_tf, T.RandomHorizontalFlip(p=data.hflip)])
    return eval_tf


# --------------------------------------------------------------------------- small images

MIN_CROP_SIDE = 16
"""A random crop whose side would be under this many pixels of the original image earns a warning."""

SIZE_SAMPLE = 64
"""How many training images :func:`small_image_warnings` reads the size of (header only)."""


def sample_image_sizes(split: Split, n: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """``(width, height)`` of up to ``n`` images spread evenly over a split, from their headers only.

    PIL reads the size without decoding the pixels, so this costs a file open per image. Files that
    cannot be opened are left out (the pre-flight scan reports them).
    """
    quiet_pil_warnings()
    step = max(1, len(split.samples) // max(n, 1))
    sizes = []
    for path, _ in split.samples[::step][:n]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return sizes


def small_image_warnings(split: Split, data_config: dict[str, Any], data: DataConfig) -> list[str]:
    """Warnings when the training images are too small for the input size or the random crop.

    The default augmentation was made for ImageNet-sized photos: on 24-pixel digits a random-resized
    crop keeps as little as 8% of the image (about 7x7 pixels) and a horizontal flip changes what a
    digit means (the issue's example: 43.7% accuracy with the defaults, 90.3% without augmentation).
    Both checks use the median size of a sample of the training images.
    """
    sizes = sample_image_sizes(split)
    if not sizes:
        return []
    width = sorted(w for w, _ in sizes)[len(sizes) // 2]
    height = sorted(h for _, h in sizes)[len(sizes) // 2]
    input_h, input_w = (int(v) for v in data_config["input_size"][1:])
    median = f"{width}x{height} px (median of {len(sizes)} training images)"
    out = []
    if min(width, height) < min(input_h, input_w) / 2:
        out.append(
            f"the training images are much smaller than the model's {input_w}x{input_h} input: {median}, so "
            f"each is upscaled {min(input_h, input_w) / min(width, height):.1f}x. If that is not intended, set "
            "data.img_size (and model.kwargs.img_size for a ViT built for one size); for small images also "
            "check data.rrc_scale and data.hflip (a mirrored digit or letter means something else)"
        )
    if data.augment == "rrc_flip":
        low = data.rrc_scale[0] if data.rrc_scale else 0.08
        side = (low * width * height) ** 0.5
        if side < MIN_CROP_SIDE:
            wanted = min(1.0, math.ceil(20 * MIN_CROP_SIDE**2 / (width * height)) / 20)
            out.append(
                f'data.augment = "rrc_flip" crops as little as {low:.0%} of an image (data.rrc_scale minimum '
                f"{low}), about {side:.0f}x{side:.0f} px of a {median}. Set data.rrc_scale = [{wanted}, 1.0] "
                f'(crops of at least {MIN_CROP_SIDE} px), or data.augment = "flip" or "none"; and '
                "data.hflip = 0 if a mirrored image means something else (digits, text)"
            )
    return out


# --------------------------------------------------------------------------- dataset and sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, epoch, index)``.

    A cryptographic hash rather than arithmetic mixing, so neighbouring samples and epochs get
    unrelated random streams.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageDataset(Dataset):
    """A :class:`Split` as a map-style dataset of ``(image tensor, label)`` pairs.

    When ``training``, the transform's randomness for sample ``i`` comes from Python's ``random``,
    numpy's and torch's CPU RNGs seeded by ``(seed, epoch, i)`` just before the transform runs, and
    the previous RNG states are restored afterwards. The augmentation is thereby independent of the
    worker process, of the number of workers and of where an epoch was resumed; restoring matters in
    the main process (``num_workers=0``), where the training loop's own RNG stream (dropout, ...)
    must not depend on how many images were loaded. Only the CPU generator is touched, never CUDA's.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable[[Any], Any] | None,
        *,
        training: bool = False,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.split = split
        self.samples = split.samples
        self.transform = transform
        self.training = training
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> tuple[Any, int]:
        """Sample ``index`` as epoch ``epoch`` augments it (the same whatever epoch the dataset is set to)."""
        path, label = self.samples[index]
        img = load_image(path)
        if self.transform is None:
            return img, label
        if not self.training:
            return self.transform(img), label
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would reseed CUDA too
            return self.transform(img), label
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


class EpochSampler(Sampler[int]):
    """Sample order for one epoch: a ``(seed, epoch)`` permutation, or sequential for evaluation.

    ``start`` skips the first items of the epoch's order, so a run resumed at batch ``k`` passes
    ``start = k * batch_size`` and continues exactly where the interrupted run was.
    """

    def __init__(
        self, num_samples: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, start: int = 0
    ) -> None:
        if num_samples < 0 or start < 0:
            raise ValueError(f"num_samples and start must be >= 0, got {num_samples} and {start}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.start = start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch``, skipping its first ``start`` items."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The full order of the current epoch, before skipping ``start`` items."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


@dataclass(frozen=True)
class BatchShard:
    """The part of one global batch that one process of a ``torchrun`` job trains on.

    The global batch (``train.batch_size`` images in the ``(seed, epoch)`` order, fewer at an epoch's
    end) is cut into micro-batches of ``chunk`` consecutive images, exactly as one process cuts it,
    and the micro-batches are dealt to the processes in contiguous, balanced groups. So every
    micro-batch is one that a one-process run with ``train.micro_batch_size = chunk`` computes too.

    Attributes:
        lo: First position (in the global batch) of this process's images.
        hi: One past its last position; ``lo == hi`` when this process gets no image of a small
            last batch (it still takes part in the step's collectives).
        first: Index of its first micro-batch among the global batch's micro-batches.
        count: Number of its micro-batches.
        total: Number of micro-batches of the whole global batch.
    """

    lo: int
    hi: int
    first: int
    count: int
    total: int


def batch_shard(n: int, chunk: int, rank: int, world: int) -> BatchShard:
    """Which images of a global batch of ``n`` go to process ``rank`` of ``world`` (see :class:`BatchShard`)."""
    if chunk < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need chunk >= 1 and 0 <= rank < world, got {chunk}, {rank}, {world}")
    total = -(-n // chunk)
    first, end = rank * total // world, (rank + 1) * total // world
    return BatchShard(min(first * chunk, n), min(end * chunk, n), first, end - first, total)


class ShardedBatchSampler(Sampler[list[int]]):
    """One process's part (:func:`batch_shard`) of every global batch of an epoch.

    Every process walks the same global order, so the global batches, and each sample's
    ``(seed, epoch, index)`` augmentation, are those of a one-process run whatever the number of
    processes; and every process yields one (possibly empty) list per global batch, so all of them
    run the same number of steps.
    """

    def __init__(
        self,
        order: EpochSampler,
        *,
        batch_size: int,
        chunk: int,
        rank: int,
        world: int,
        start_batch: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.order = order
        self.batch_size = batch_size
        self.chunk = chunk
        self.rank = rank
        self.world = world
        self.start_batch = start_batch
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order.order()
        end = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(self.start_batch * self.batch_size, end, self.batch_size):
            batch = order[start : start + self.batch_size]
            part = batch_shard(len(batch), self.chunk, self.rank, self.world)
            yield batch[part.lo : part.hi]

    def __len__(self) -> int:
        n = self.order.num_samples
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return max(0, batches - self.start_batch)


@dataclass(frozen=True)
class BlankFill:
    """Collate a process's part of a batch; an empty part becomes two blank images with no labels.

    A process without images in a small last batch still runs its forward and backward pass: DDP's
    gradient all-reduce and FSDP's parameter all-gathers need every process. The blank images carry
    no label, so the trainer gives them zero loss weight and evaluation counts nothing for them.
    Two rather than one, so that BatchNorm in training mode has more than one value per channel.
    """

    input_size: tuple[int, ...]

    def __call__(self, batch: list[tuple[Any, int]]) -> Any:
        if batch:
            return default_collate(batch)
        return torch.zeros((2, *self.input_size)), torch.zeros(0, dtype=torch.long)


SampleKey = tuple[int, int, int]
"""``(dataset, epoch, index)``: one sample of one of :class:`RunLoader`'s datasets, as one epoch loads it."""


class _KeyedDatasets(Dataset):
    """Several :class:`ImageDataset` behind one DataLoader: a key names the dataset, the epoch and the sample.

    The epoch travels with every key rather than being set on the dataset, because persistent worker
    processes hold their own copy of the dataset, which a later ``set_epoch`` in the trainer never reaches.
    """

    def __init__(self, datasets: list[ImageDataset]) -> None:
        self.datasets = datasets

    def __getitem__(self, key: SampleKey) -> tuple[Any, int]:  # type: ignore[override]
        dataset, epoch, index = key
        return self.datasets[dataset].item(index, epoch)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


class _BatchPlan(Sampler[list[SampleKey]]):
    """The batches of the DataLoader's next pass, replaced before each pass (an epoch, a split's evaluation)."""

    def __init__(self) -> None:
        self.batches: list[list[SampleKey]] = []

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RunLoader:
    """One DataLoader, with persistent workers, for every pass of a training run over its data.

    Training epochs and every evaluation split go through the same worker processes, started once,
    instead of a new DataLoader (and new workers) per epoch and per split. Each pass is planned in the
    main process as lists of sample keys (:data:`SampleKey`): the batches, their order, the skipped
    batches of a resumed epoch and each process's share in a job are exactly those :func:`build_loader`
    gives, and per-sample augmentation is seeded by ``(seed, epoch, index)`` as before, so the images,
    and a resumed run's bits, are unchanged.

    Args:
        train: The training split and its transform (augmented per sample).
        evaluation: ``{name: split}`` of the splits evaluated after each epoch.
        eval_transform: Their transform (no augmentation).
        seed: The run's seed.
        num_workers: Worker processes (resolved), kept alive for the whole run; 0 loads in this process.
        pin_memory: Pin batches for faster host-to-GPU copies.
        input_size: ``(C, H, W)``, for the blank batches of :class:`BlankFill`.
    """

    def __init__(
        self,
        train: tuple[Split, Callable[[Any], Any]],
        evaluation: dict[str, Split],
        eval_transform: Callable[[Any], Any],
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        input_size: tuple[int, ...] = (3, 224, 224),
    ) -> None:
        datasets = [ImageDataset(train[0], train[1], training=True, seed=seed)]
        datasets += [ImageDataset(split, eval_transform, seed=seed) for split in evaluation.values()]
        self.datasets = datasets
        self.eval_index = {name: i + 1 for i, name in enumerate(evaluation)}
        self.seed = seed
        self.plan = _BatchPlan()
        self.loader = DataLoader(
            _KeyedDatasets(datasets),
            batch_sampler=self.plan,
            collate_fn=BlankFill(tuple(input_size)),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed * 100003),
        )

    def train_epoch(
        self,
        epoch: int,
        *,
        batch_size: int,
        start_batch: int = 0,
        drop_last: bool = False,
        shard: tuple[int, int, int] | None = None,
    ) -> DataLoader:
        """The loader, planned for ``epoch``'s training batches from ``start_batch`` on (see :func:`build_loader`)."""
        order = EpochSampler(len(self.datasets[0]), seed=self.seed, epoch=epoch)
        self._plan(0, epoch, order, batch_size, start_batch, drop_last, shard)
        return self.loader

    def evaluation(
        self, name: str, *, batch_size: int, shard: tuple[int, int, int] | None = None
    ) -> DataLoader:
        """The loader, planned for split ``name`` in file order, without augmentation."""
        dataset = self.eval_index[name]
        order = EpochSampler(len(self.datasets[dataset]), shuffle=False, seed=self.seed)
        self._plan(dataset, 0, order, batch_size, 0, False, shard)
        return self.loader

    def _plan(
        self,
        dataset: int,
        epoch: int,
        order: EpochSampler,
        batch_size: int,
        start_batch: int,
        drop_last: bool,
        shard: tuple[int, int, int] | None,
    ) -> None:
        if shard is not None:
            chunk, rank, world = shard
            batches: Iterable[list[int]] = ShardedBatchSampler(
                order, batch_size=batch_size, chunk=chunk, rank=rank, world=world,
                start_batch=start_batch, drop_last=drop_last,
            )  # fmt: skip
        else:
            order.set_epoch(epoch, min(order.num_samples, start_batch * batch_size))
            batches = BatchSampler(order, batch_size, drop_last)
        self.plan.batches = [[(dataset, epoch, i) for i in batch] for batch in batches]


def _worker_init(worker_id: int) -> None:
    """Seed a worker's global RNGs from its torch seed (itself from the loader's seeded generator).

    Per-sample seeding in :class:`ImageDataset` already makes augmentation deterministic; this only
    keeps any other randomness in a worker reproducible instead of inherited from the parent.
    """
    s = torch.initial_seed()
    random.seed(s)
    np.random.seed(s % 2**32)


def resolve_num_workers(n: int) -> int:
    """Turn ``data.num_workers`` into a worker count.

    Args:
        n: ``-1`` for automatic, otherwise the count itself (0 = load in the main process).

    Returns:
        ``min(8, usable CPUs - 1)`` for ``-1`` (one CPU stays with the training loop), else ``n``.
        Usable CPUs respect the process's CPU affinity (containers, Slurm) where the OS reports it.
    """
    if n >= 0:
        return n
    if n != -1:
        raise ValueError(f"num_workers must be -1 (auto) or >= 0, got {n}")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def epoch_steps(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in one epoch: every batch, or (``data.drop_last``) only the full ones.

    Raises:
        DataError: ``drop_last`` with fewer images than one batch: an epoch would train on nothing.
    """
    if not drop_last:
        return math.ceil(num_samples / batch_size)
    if num_samples < batch_size:
        raise DataError(
            f"data.drop_last = true leaves no training batch: the training split has {num_samples} images, "
            f"fewer than train.batch_size = {batch_size}; set data.drop_last = false or a smaller batch size"
        )
    return num_samples // batch_size


def build_loader(
    split: Split,
    transform: Callable[[Any], Any] | None,
    *,
    batch_size: int,
    training: bool,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int, int] | None = None,
    input_size: tuple[int, ...] = (3, 224, 224),
    drop_last: bool = False,
) -> DataLoader:
    """A deterministic DataLoader for one epoch of a split.

    Args:
        split: The split to load.
        transform: From :func:`build_transform`.
        batch_size: Images per batch; the last batch may be smaller unless ``drop_last``.
        training: Shuffle with the ``(seed, epoch)`` permutation and draw augmentations per sample;
            False loads in file order.
        seed: The run's seed.
        epoch: Epoch whose order and augmentations to use. For later epochs either build a new loader
            or call ``loader.dataset.set_epoch(e)`` and ``loader.sampler.set_epoch(e)``; workers are
            not persistent, so both take effect on the next iteration.
        start_batch: Skip this many batches of the epoch (resume mid-epoch).
        num_workers: Worker processes (already resolved, see :func:`resolve_num_workers`).
        pin_memory: Pin batches for faster host-to-GPU copies.
        shard: ``(chunk, rank, world)`` in a multi-process job: ``batch_size`` is the global batch and
            this loader yields process ``rank``'s part of each one (:class:`ShardedBatchSampler`,
            :class:`BlankFill`); None loads whole batches.
        input_size: ``(C, H, W)`` of the transformed images, for :class:`BlankFill`.
        drop_last: Leave out the epoch's last batch when it is smaller than ``batch_size``
            (``data.drop_last``); skipping ``start_batch`` whole batches keeps the same batches.

    Returns:
        The DataLoader; ``len(loader)`` counts only the batches left after ``start_batch``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    dataset = ImageDataset(split, transform, training=training, seed=seed, epoch=epoch)
    if shard is not None:
        return _sharded_loader(
            dataset,
            batch_size,
            shard,
            start_batch,
            input_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
        )
    sampler = EpochSampler(
        len(dataset),
        shuffle=training,
        seed=seed,
        epoch=epoch,
        start=min(len(dataset), start_batch * batch_size),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed * 100003 + epoch),
    )


def _sharded_loader(
    dataset: ImageDataset,
    batch_size: int,
    shard: tuple[int, int, int],
    start_batch: int,
    input_size: tuple[int, ...],
    *,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool = False,
) -> DataLoader:
    """:func:`build_loader` for one process of a multi-process job (see ``shard`` there)."""
    chunk, rank, world = shard
    order = EpochSampler(len(dataset), shuffle=dataset.training, seed=dataset.seed, epoch=dataset.epoch)
    batches = ShardedBatchSampler(
        order,
        batch_size=batch_size,
        chunk=chunk,
        rank=rank,
        world=world,
        start_batch=start_batch,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=BlankFill(tuple(input_size)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(dataset.seed * 100003 + dataset.epoch),
    )


__all__ = [
    "IMG_EXTENSIONS",
    "NO_EXTENSION",
    "OUTSIDE_CLASS",
    "REPEATED_FOLDER",
    "SKIPPED_FILE",
    "BadImage",
    "BatchShard",
    "BlankFill",
    "EpochSampler",
    "IgnoredFile",
    "IgnoredTally",
    "ImageDataset",
    "RunLoader",
    "SampleKey",
    "ShardedBatchSampler",
    "Split",
    "batch_shard",
    "build_loader",
    "build_transform",
    "check_image",
    "discover_splits",
    "epoch_steps",
    "find_classes",
    "ignored_warnings",
    "is_image_file",
    "iter_image_files",
    "load_image",
    "preflight_scan",
    "quiet_pil_warnings",
    "resolve_num_workers",
    "sample_image_sizes",
    "scan_images",
    "scan_images_cached",
    "skipped_lines",
    "small_image_warnings",
    "timm_auto_augment",
    "to_rgb",
    "train_transform_kwargs",
    "upright",
]
