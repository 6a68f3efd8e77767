"""Where the pre-flight scan remembers which image files it already decoded successfully.

The pre-flight scan (:func:`ftsgd.data.preflight_scan`) decodes every image before a run starts, so
a bad file fails the run in seconds. On a large dataset that is minutes of work, repeated by every
rerun, resume, sweep member and cron job although the files have not changed. This module stores,
per split folder, the files that decoded fine together with their size and modification time
(nanoseconds); a later scan skips a file whose ``(absolute path, size, mtime_ns)`` is unchanged and
decodes everything else. Only good results are stored: a file that failed is decoded again on every
scan, so it stays reported until it is fixed.

Layout: one JSON file per split folder, ``<cache dir>/scan/<sha256 of the folder's absolute path>.json``,
holding the folder's path and ``{relative path: [size, mtime_ns]}``. The cache dir is
``$FTSGD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/ftsgd``, else ``~/.cache/ftsgd``;
``FTSGD_SCAN_CACHE=0`` turns the cache off.

Robustness, because a cache must never be the reason a run fails:

* every write goes through :func:`ftsgd.fileio.atomic_write_text` (temporary file + ``os.replace``),
  so two runs scanning the same folder at once each replace the whole file with a complete one; the
  last writer wins and at worst some files are decoded again next time (no locks, which also keeps
  it safe on NFS home directories, where sqlite's locking is not);
* a missing, unreadable, truncated, foreign or otherwise corrupt cache file is treated as empty and
  rewritten; a failed write (read-only home, disk full) is ignored;
* the folder is kept under :data:`MAX_BYTES`: after each write the least recently used files are
  deleted (a hit refreshes a file's modification time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from ftsgd.errors import FtsgdError
from ftsgd.utils.cachedir import user_cache_dir
from ftsgd.utils.fileio import atomic_write_text

FORMAT = "ftsgd-scan-cache"
"""Marker stored in every cache file, so a foreign JSON file is never mistaken for a cache."""

VERSION = 1
"""Bumped when the meaning of an entry changes (e.g. the scan checks more); older files are ignored."""

MAX_BYTES = 256 * 2**20
"""Upper bound on the scan cache folder; ~70 bytes per image, so ImageNet-1k's 1.3M images fit."""

STALE_TEMP_SECONDS = 3600
"""A temporary left by a writer that was killed is removed once it is this old (never a live one)."""

Entry = tuple[int, int]
"""``(size in bytes, st_mtime_ns)`` of a file as it was when it decoded fine."""


def scan_cache_dir() -> Path | None:
    """The folder holding the scan cache, or ``None`` when ``FTSGD_SCAN_CACHE`` turns it off.

    Returns:
        ``$FTSGD_CACHE_DIR/scan``, else ``$XDG_CACHE_HOME/ftsgd/scan``, else ``~/.cache/ftsgd/scan``;
        None too when that would be under a home directory that does not exist (never created).
    """
    if os.environ.get("FTSGD_SCAN_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    base = user_cache_dir()
    return None if base is None else base / "scan"


def cache_file(directory: Path, root: Path | str) -> Path:
    """The cache file of the split folder ``root`` (named by a hash of its absolute path)."""
    key = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return directory / f"{key}.json"


def load_entries(directory: Path, root: Path | str) -> dict[str, Entry] | None:
    """Read the good files recorded for ``root``.

    Args:
        directory: The scan cache folder (:func:`scan_cache_dir`).
        root: The split folder; entries are keyed by paths relative to it, ``/``-separated.

    Returns:
        ``{relative path: (size, mtime_ns)}``, or ``None`` if there is no usable cache file (missing,
        unreadable, corrupt, another version or another folder's), which the caller rewrites.
    """
    try:
        raw = json.loads(cache_file(directory, root).read_text(encoding="utf-8"))
        if (
            raw.get("format") != FORMAT
            or raw.get("version") != VERSION
            or raw.get("root") != os.path.abspath(root)
        ):
            return None
        return {str(rel): (int(size), int(mtime)) for rel, (size, mtime) in raw["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        return None


def store_entries(
    directory: Path, root: Path | str, entries: dict[str, Entry], *, max_bytes: int = MAX_BYTES
) -> bool:
    """Replace the cache file of ``root`` with ``entries``, then keep the folder under ``max_bytes``.

    Never raises for I/O problems: a cache that cannot be written only costs time.

    Returns:
        Whether the file was written (False when the folder cannot be created or written, or when
        this one file alone would exceed ``max_bytes``).
    """
    text = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "root": os.path.abspath(root),
            "files": {rel: list(entry) for rel, entry in sorted(entries.items())},
        },
        separators=(",", ":"),
    )
    path = cache_file(directory, root)
    if len(text) > max_bytes:
        return False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except (OSError, FtsgdError):
        return False
    evict(directory, max_bytes=max_bytes, keep=path)
    return True


def touch(directory: Path, root: Path | str) -> None:
    """Mark the cache file of ``root`` as just used (eviction removes the least recently used)."""
    with contextlib.suppress(OSError):
        os.utime(cache_file(directory, root))


def evict(directory: Path, *, max_bytes: int = MAX_BYTES, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used cache files until the folder holds at most ``max_bytes``.

    Temporaries of writers killed more than :data:`STALE_TEMP_SECONDS` ago are deleted too. Files
    another process deletes meanwhile are skipped.

    Args:
        directory: The scan cache folder.
        max_bytes: Size to stay under.
        keep: A file never to delete (the one just written).

    Returns:
        The files deleted.
    """
    now = time.time()
    files: list[tuple[float, int, Path]] = []
    removed: list[Path] = []
    try:
        listing = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in listing:
        try:
            st = entry.stat()
        except OSError:
            continue
        path = Path(entry.path)
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if now - st.st_mtime > STALE_TEMP_SECONDS:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
        elif entry.name.endswith(".json"):
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):  # oldest first
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
        total -= size
    return removed


__all__ = ["MAX_BYTES", "cache_file", "evict", "load_entries", "scan_cache_dir", "store_entries", "touch"]
