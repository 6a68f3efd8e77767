"""The pre-flight scan: every image is decoded before a run starts, so a bad file fails it in seconds."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ftsgd.data import scancache
from ftsgd.data.folders import Split, _shorten, _shown
from ftsgd.data.images import quiet_pil_warnings, to_rgb, upright
from ftsgd.errors import DataError
from ftsgd.recipe.schema import BAD_IMAGE_ACTIONS
from ftsgd.utils.distributed import gather_objects

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
    """The contents of a run's ``skipped.txt``: one ``path<TAB>split<TAB>kind: detail`` line per file."""
    return "".join(f"{b.path}\t{b.split}\t{b.kind}: {b.detail}\n" for b in bad)
