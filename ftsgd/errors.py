"""One error family for everything ftsgd reports to a user.

The CLI catches :class:`FtsgdError`, prints its message without a traceback and exits with
``exit_code``: 2 for things the user must fix before running (usage, recipe, data, weights),
1 for a run that started and failed. ``FTSGD_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations


class FtsgdError(Exception):
    """Base class: a message meant for the user, and the exit code the CLI should use."""

    exit_code: int = 1

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_from_worker(args[0]),)
        super().__init__(*args)


def _from_worker(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker process.

    torch re-creates a worker's exception as ``type(exc)("Caught X in DataLoader worker process N.
    Original Traceback ...")``: the user would see a traceback after all. Keep the last line's text.
    """
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    _, sep, text = message[message.rfind("\nftsgd.errors.") + 1 :].partition(": ")
    return text.rstrip() if sep and "\nftsgd.errors." in message else message


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UsageError(FtsgdError):
    """Bad command-line usage or arguments."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe that cannot be used; ``problems`` holds one line per offending key path."""

    def __init__(self, problems: list[str] | str, source: str = "recipe") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class DataError(UsageError):
    """A dataset folder that cannot be used as given."""


class WeightsError(UsageError):
    """A weights file that cannot be read safely or does not fit the model."""


class ModelError(UsageError):
    """A model name or model option that timm cannot build."""


class RunError(FtsgdError):
    """A run that started and failed (NaN loss, out of memory, I/O failure, ...)."""

    exit_code = 1


class Interrupted(FtsgdError):
    """SIGINT/SIGTERM stopped a run after a checkpoint was saved; exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
