"""How a command ends: an :class:`~ftsgd.errors.FtsgdError` or a closed pipe becomes a message and an exit code.

Every command runs inside :func:`user_errors`, so the user sees one paragraph saying what was wrong and
how to fix it, never a traceback (``FTSGD_DEBUG=1`` shows it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer

from ftsgd.errors import FtsgdError, Interrupted
from ftsgd.utils import console

STDOUT_ERRNOS = frozenset({errno.ENOSPC, errno.EBADF, errno.EIO, errno.EPIPE})
"""Errors of writing the output itself (a full disk, a closed descriptor), not of a command's work."""


def unwritable_stdout(reason: str) -> NoReturn:
    """End with ``reason`` on stderr and exit 1; what is left unflushed goes nowhere (no error at exit)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        if sys.stdout is not None:
            os.dup2(devnull, sys.stdout.fileno())
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(f"error: {reason}\n")
        sys.stderr.flush()
    raise SystemExit(1)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`FtsgdError` into a one-paragraph message and its exit code (no traceback).

    ``FTSGD_DEBUG=1`` lets the exception through so the traceback is shown.
    """
    try:
        yield
    except FtsgdError as exc:
        if os.environ.get("FTSGD_DEBUG") == "1":
            raise
        if not (isinstance(exc, Interrupted) and console.secondary_rank()):  # rank 0 says how to resume
            console.error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except BrokenPipeError:
        # `ftsgd ... | head`: the reader is gone. Stop quietly with the status a process killed by SIGPIPE
        # has (as `cat` would), and keep Python from complaining about the unflushed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
