"""What a folder entry is, before anything reads it: a special file, a name that is not UTF-8.

Linux names are bytes and a folder may hold named pipes, sockets or devices with an image's extension.
Opening a named pipe blocks until someone writes to it, so every listing leaves such entries out before
any image is opened; a folder name that is not UTF-8 cannot label a class in a UTF-8 ``config.json``.
"""

from __future__ import annotations

import os
import stat

__all__ = ["is_special", "is_utf8"]


def is_special(entry: os.DirEntry[str]) -> bool:
    """A named pipe, socket or device (or a link to one); a dangling link is left to the scan to report."""
    try:
        return not stat.S_ISREG(entry.stat().st_mode)
    except OSError:
        return False


def is_utf8(name: str) -> bool:
    """Whether a name read from the file system (surrogate-escaped bytes) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
