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
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ftsgd import scancache
from ftsgd.errors import DataError
from ftsgd.recipe import AUGMENTS, BAD_IMAGE_ACTIONS, DataConfig

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
"""File extensions read as images (compared case-insensitively), as in timm and torchvision."""

LAYOUT_HINT = (
    "expected layout: <root>/train/<class>/<image>, <root>/val/<class>/<image>, and optionally more "
    "evaluation splits such as <root>/ood/<class>/<image>"
)


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


def _list_images(class_dir: Path) -> list[Path]:
    """All image files under ``class_dir`` (recursively, following links), in a stable sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath, f) for f in filenames if not _is_hidden(f) and is_image_file(f))
    return sorted(found)


def _has_image_folder_layout(folder: Path) -> bool:
    """Cheaply decide whether ``folder`` looks like a split: a class sub-folder holding an image.

    Stops at the first image found so discovery stays fast on large datasets.
    """
    for class_dir in find_classes(folder):
        for _dirpath, dirnames, filenames in os.walk(folder / class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            if any(not _is_hidden(f) and is_image_file(f) for f in filenames):
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
    samples: list[tuple[Path, int]] = []
    empty: list[str] = []
    for c in classes:
        files = _list_images(split_dir / c)
        if not files:
            empty.append(c)
        samples.extend((f, class_to_idx[c]) for f in files)
    if empty:
        raise DataError(
            f"{name} split {split_dir}: class folder(s) without images: {', '.join(empty)}. "
            f"Add images ({', '.join(IMG_EXTENSIONS)}) or remove the empty folder(s)."
        )
    return Split(name=name, root=split_dir, samples=tuple(samples), classes=tuple(classes))


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
        DataError: Missing root/train/val, a split whose class folder is not a known class, an empty
            split or class folder, two evaluation splits with the same name, or an explicitly listed
            split that does not exist.
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

    if class_names is not None:
        if not class_names:
            raise DataError("the model's class list is empty; its metadata is missing or damaged")
        classes = list(class_names)
        known = "the model's class list"
    else:
        classes = find_classes(train_dir)
        known = f"the train split ({train_dir})"
        if not classes:
            # Let _load_split explain (loose images vs. nothing at all).
            _load_split("train", train_dir, {}, known)
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

    extra: list[tuple[str, Path]] = []
    discovered = not cfg.eval_splits
    if cfg.eval_splits:
        for entry in cfg.eval_splits:
            path = _resolve(root, entry)
            if not path.is_dir():
                problems.append(f"evaluation split {entry!r} (data.eval_splits): {path} does not exist")
                continue
            extra.append((path.name, path))
    else:
        for name in find_classes(root):  # sorted, non-hidden sub-folders
            path = root / name
            if not any(_same_dir(path, t) for t in taken) and _has_image_folder_layout(path):
                extra.append((name, path))

    for name, path in extra:
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


def _data_problems(problems: list[str], root: Path, hint: str = "") -> DataError:
    """One error for all the problems found; a single problem keeps its own message."""
    tail = f"; {hint}" if hint else ""
    if len(problems) == 1:
        return DataError(problems[0] + tail)
    lines = "\n".join(f"  - {p}" for p in problems)
    return DataError(
        f"{len(problems)} problems with the dataset {root}:\n{lines}" + (f"\n{hint}" if hint else "")
    )


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


def load_image(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB (first frame of multi-frame files).

    Raises:
        DataError: The file cannot be decoded; the message names it.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from exc


# --------------------------------------------------------------------------- pre-flight scan


SKIPPED_FILE = "skipped.txt"
"""Run-directory file listing the images ``data.on_bad_image = "skip"`` left out (path, split, reason)."""

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
    """
    path = Path(path)
    try:
        if os.stat(path).st_size == 0:
            return "empty file", "0 bytes"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/palette warnings are not problems
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                to_rgb(img)
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
    roots: dict[Path, Path], directory: Path, *, workers: int = 0
) -> dict[Path, tuple[str, str]]:
    """:func:`scan_images`, skipping files the scan cache knows as good and unchanged.

    Args:
        roots: Each file to check -> the split folder it belongs to (one cache file per folder).
        directory: The scan cache folder (:func:`ftsgd.scancache.scan_cache_dir`).
        workers: Threads; 0 = automatic.

    Returns:
        ``{path: (kind, detail)}`` for the files that failed. Afterwards each folder's cache file
        holds exactly the files found good now (rewritten only if that changed).
    """
    prefixes = {root: str(root) + os.sep for root in dict.fromkeys(roots.values())}
    loaded = {root: scancache.load_entries(directory, root) for root in prefixes}
    paths = list(roots)
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
    for root, entries in good.items():
        if entries != loaded[root]:
            scancache.store_entries(directory, root, entries)
        else:
            scancache.touch(directory, root)
    return failed


def _bad_image_report(bad: list[BadImage], checked: int, root: Path | None, action: str) -> str:
    def shown(path: Path) -> str:
        if root is not None:
            try:
                return str(path.relative_to(root))
            except ValueError:
                pass
        return str(path)

    by_kind: dict[str, list[BadImage]] = {}
    for b in bad:
        by_kind.setdefault(b.kind, []).append(b)
    where = f" under {root}" if root is not None else ""
    lines = [f"{len(bad)} of {checked} image files{where} cannot be read ({action}):"]
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {kind} ({len(items)}):")
        for b in items[:_SHOW_PER_KIND]:
            lines.append(f"    {shown(b.path)}: {b.detail}")
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
    if directory is None:
        failed = scan_images(owner, workers=workers)
    else:
        failed = scan_images_cached(
            {p: splits[name].root for p, name in owner.items()}, directory, workers=workers
        )
    bad = [BadImage(path, owner[path], *failed[path]) for path in owner if path in failed]
    if not bad:
        return splits, []
    if on_bad_image == "error":
        report = _bad_image_report(bad, len(owner), root, "pre-flight scan")
        raise DataError(
            f"{report}\nFix or remove these files, or leave them out with "
            '--set data.on_bad_image=skip (data.on_bad_image = "skip" in the recipe); '
            "skipped files are listed in the run directory."
        )
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


def build_transform(data_config: dict[str, Any], augment: str, training: bool) -> Callable[[Any], Any]:
    """Build the image -> normalised tensor transform for one split.

    Args:
        data_config: The model's timm data config (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``), e.g. from ``timm.data.resolve_model_data_config``;
            normalising with the model's own statistics matters for fine-tuning pretrained weights.
        augment: ``rrc_flip``: timm's training transform (random-resized crop + horizontal flip),
            with colour jitter, auto-augment and random erasing off, as in the paper.
            ``flip``: the eval transform (resize + centre crop) plus a random horizontal flip.
            ``none``: the eval transform.
        training: False gives the eval transform whatever ``augment`` says.

    Returns:
        A callable turning a PIL RGB image into a CHW float tensor.
    """
    from timm.data import create_transform

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {', '.join(AUGMENTS)}")
    kwargs = _transform_kwargs(data_config)
    if training and augment == "rrc_flip":
        return create_transform(**kwargs, is_training=True, color_jitter=None, auto_augment=None, re_prob=0.0)
    eval_tf = create_transform(**kwargs, is_training=False)
    if training and augment == "flip":
        # Flipping the normalised tensor is the same as flipping the image before ToTensor.
        return T.Compose([eval_tf, T.RandomHorizontalFlip(p=0.5)])
    return eval_tf


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
        path, label = self.samples[index]
        img = load_image(path)
        if self.transform is None:
            return img, label
        if not self.training:
            return self.transform(img), label
        s = sample_seed(self.seed, self.epoch, index)
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
) -> DataLoader:
    """A deterministic DataLoader for one epoch of a split.

    Args:
        split: The split to load.
        transform: From :func:`build_transform`.
        batch_size: Images per batch; the last batch may be smaller (nothing is dropped).
        training: Shuffle with the ``(seed, epoch)`` permutation and draw augmentations per sample;
            False loads in file order.
        seed: The run's seed.
        epoch: Epoch whose order and augmentations to use. For later epochs either build a new loader
            or call ``loader.dataset.set_epoch(e)`` and ``loader.sampler.set_epoch(e)``; workers are
            not persistent, so both take effect on the next iteration.
        start_batch: Skip this many batches of the epoch (resume mid-epoch).
        num_workers: Worker processes (already resolved, see :func:`resolve_num_workers`).
        pin_memory: Pin batches for faster host-to-GPU copies.

    Returns:
        The DataLoader; ``len(loader)`` counts only the batches left after ``start_batch``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    dataset = ImageDataset(split, transform, training=training, seed=seed, epoch=epoch)
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
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed * 100003 + epoch),
    )


__all__ = [
    "IMG_EXTENSIONS",
    "SKIPPED_FILE",
    "BadImage",
    "EpochSampler",
    "ImageDataset",
    "Split",
    "build_loader",
    "build_transform",
    "check_image",
    "discover_splits",
    "find_classes",
    "is_image_file",
    "load_image",
    "preflight_scan",
    "resolve_num_workers",
    "scan_images",
    "scan_images_cached",
    "skipped_lines",
    "to_rgb",
]
