"""The console-script entry point (``ftsgd`` and ``python -m ftsgd``)."""

from __future__ import annotations

import os
import sys

from ftsgd.cli.app import app
from ftsgd.cli.errors import STDOUT_ERRNOS, unwritable_stdout

__all__ = ["main"]


def main() -> None:
    """Console-script entry point: the app, and standard output that cannot be written ended quietly.

    ``ftsgd ... >&-`` starts without a standard output and ``> /dev/full`` fails every write: neither is
    a reason for a traceback. Like a closed pipe (141, :func:`ftsgd.cli.errors.user_errors`), the command
    ends with one line on stderr and exit 1.
    """
    if sys.stdout is None:
        unwritable_stdout("standard output is closed")
    try:
        app()
    except OSError as exc:
        if exc.errno not in STDOUT_ERRNOS or os.environ.get("FTSGD_DEBUG") == "1":
            raise
        unwritable_stdout(f"cannot write to standard output: {exc.strerror}")
