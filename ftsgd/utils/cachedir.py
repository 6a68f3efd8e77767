"""Where ftsgd keeps caches, and what it does when the home directory is not there.

Cron jobs and service accounts often run with ``HOME`` set to a folder that does not exist
(``/nonexistent`` is the Debian convention). Creating ``$HOME/.cache`` then creates a home directory, a
side effect nobody asked for (and a failure where the parent is not writable). A cache only saves time,
so without a home it is simply off, with a note.
"""

from __future__ import annotations

import os
from pathlib import Path

from ftsgd.utils.console import warn

__all__ = ["user_cache_dir"]

_noted: set[str] = set()


def user_cache_dir(*, ftsgd_variable: bool = True) -> Path | None:
    """``$FTSGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/ftsgd``, else ``~/.cache/ftsgd``; None without a home.

    Args:
        ftsgd_variable: Whether ``FTSGD_CACHE_DIR`` applies (it is the scan cache's own setting).
    """
    base = os.environ.get("FTSGD_CACHE_DIR") if ftsgd_variable else None
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "ftsgd"
    home = Path("~").expanduser()
    if str(home) == "~" or not home.is_dir():
        if str(home) not in _noted:
            _noted.add(str(home))
            warn(
                f"the home directory {home} does not exist, so ftsgd keeps no cache (set XDG_CACHE_HOME "
                "or FTSGD_CACHE_DIR to a folder to keep one)"
            )
        return None
    return home / ".cache" / "ftsgd"
