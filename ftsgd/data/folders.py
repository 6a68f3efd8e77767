"""Reading an image-folder dataset: its splits, classes and image files.

What the walk leaves out is recorded here (:class:`IgnoredFile`, on :attr:`Split.ignored`) and
reported by :mod:`ftsgd.data.ignored`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import features

from ftsgd.data.entries import is_special, is_utf8
from ftsgd.errors import DataError
from ftsgd.recipe.schema import DataConfig

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
and counted (see :func:`ftsgd.data.ignored.ignored_warnings`), never dropped silently.
"""


NO_EXTENSION = "no extension"
""":attr:`IgnoredFile.reason` of a file whose name has no extension."""


OUTSIDE_CLASS = "outside a class folder"
""":attr:`IgnoredFile.reason` of a file directly in a split folder, where it has no class."""


NOT_REGULAR = "not a regular file"
""":attr:`IgnoredFile.reason` of a named pipe, socket or device: opening one can block for ever, so it is never read."""

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
    """What discovery left out of this split and why (hidden files aside), for :mod:`ftsgd.data.ignored`."""
    drawn: bool = False
    """Drawn by ftsgd from one folder of class folders (:mod:`ftsgd.data.split`), not a folder of its own."""

    def __len__(self) -> int:
        return len(self.samples)


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

    Raises:
        DataError: a folder name is not valid UTF-8 (Linux names are bytes). Class and split names label
            the model's outputs, its metrics and its exported ``config.json``, which are UTF-8 text, so
            such a folder is refused here, before anything is decoded or trained, not at the first export.
    """
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))
    bad = [name for name in names if not is_utf8(name)]
    if bad:
        shown = ", ".join(repr(os.fsencode(name))[1:] for name in bad)
        raise DataError(
            f"{split_dir}: folder name(s) {shown} are not valid UTF-8; class and split names label the model's "
            "outputs and its exported config, so rename them to UTF-8 (e.g. `convmv -f latin1 -t utf-8 -r "
            f"--notest {split_dir}`)"
        )
    return names


_IMAGE, _OTHER, _SPECIAL, _REPEAT, _CLASH = "image", "other", "special", "repeat", "clash"
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
            elif is_special(entry):
                yield _SPECIAL, Path(entry.path), None
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
        elif kind == _SPECIAL:
            ignored.append(IgnoredFile(path, NOT_REGULAR))
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
        elif is_special(entry):
            if on_ignored is not None:
                on_ignored(IgnoredFile(Path(entry.path), NOT_REGULAR))
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


def _shown(path: Path, root: Path | None) -> str:
    """``path`` as messages show it: relative to ``root`` when it is under it."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


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
    :attr:`Split.ignored`: show them with :func:`ftsgd.data.ignored.ignored_warnings`.
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
