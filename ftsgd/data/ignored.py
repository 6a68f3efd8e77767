"""The report of what folder discovery left out: files not read as images, folder links not followed.

:mod:`ftsgd.data.folders` records each file it does not take as an image (:class:`IgnoredFile`, with
its reason) and goes on; this module turns those records into ftsgd's warnings, grouped by reason
with a count, a hint on what to do and a few examples, because a dataset whose HEIC photos or
extension-less files were skipped silently trains on less than its owner thinks. It is apart from
the walk so that the walk reads as the layout it accepts, and ``ftsgd predict`` can tally a stream of
files with the same words (:class:`IgnoredTally`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ftsgd.data.folders import NO_EXTENSION, OUTSIDE_CLASS, REPEATED_FOLDER, IgnoredFile, Split, _shown
from ftsgd.data.images import quiet_pil_warnings

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
