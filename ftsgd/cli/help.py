"""How ``--help`` looks: the exit-code epilog and the Typer classes every command and group is built with."""

from __future__ import annotations

from typing import Any

import typer

EXIT_CODES = (
    "Exit codes: 0 done; 1 the run failed; 2 bad usage, recipe, data or weights (nothing was started); "
    "130/143/138 interrupted by SIGINT/SIGTERM/SIGUSR1 (checkpoint saved); 141 the reader of the output went away."
)
"""The epilog of every ``--help`` page."""

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
"""Typer ``context_settings``: ``-h`` as well as ``--help``."""


class ValuelessHelp:
    """Lists the ``-h`` flag without a value type, like every other flag (mixed into commands and groups)."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class LiteralBrackets:
    """Help text is shown as written: ``pip install 'ftsgd[onnx]'`` keeps its ``[onnx]`` (mixed in).

    Typer renders help through rich markup, where ``[onnx]`` is a style tag and silently vanishes; every
    text of a command (its help, its options' help) is escaped once, when the command is built.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from rich.markup import escape

        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if isinstance(getattr(self, "help", None), str):
            self.help = reflow(self.help)
        for owner in (self, *getattr(self, "params", [])):
            for attr in ("help", "epilog", "short_help"):
                text = getattr(owner, attr, None)
                if isinstance(text, str) and "[" in text:
                    setattr(owner, attr, escape(text))


def reflow(text: str) -> str:
    """Prose paragraphs joined into one line each, so the terminal wraps them evenly; examples kept as written.

    Typer keeps a docstring's line breaks, which were made for the source file's width: at 80 columns every
    such line wraps again, raggedly. A paragraph with a command line (``ftsgd ...``) or an indented line keeps
    its breaks, since a copied example must stay the command it shows.
    """
    paragraphs = text.split("\n\n")
    out = []
    for paragraph in paragraphs:
        lines = paragraph.strip("\n").splitlines()
        literal = any(
            line.strip().startswith(("ftsgd ", "find ", "|")) or line.startswith("    ") for line in lines
        )
        out.append(paragraph if literal else " ".join(line.strip() for line in lines))
    return "\n\n".join(out)


class Command(LiteralBrackets, ValuelessHelp, typer.core.TyperCommand):
    """A command whose help shows brackets literally and whose ``-h`` flag is listed without a value type."""


class Group(LiteralBrackets, ValuelessHelp, typer.core.TyperGroup):
    """A command group whose help shows brackets literally and whose ``-h`` is listed without a value type."""
