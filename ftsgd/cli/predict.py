"""``ftsgd predict``: classify new images, streaming one result per image."""

from __future__ import annotations

import csv
import json
import re
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import IO

from ftsgd.data.ignored import IgnoredTally
from ftsgd.data.loader import resolve_num_workers
from ftsgd.errors import RunError, UsageError
from ftsgd.infer.predict import Prediction, Predictor, check_sources, csv_header, iter_items
from ftsgd.utils import console

PREDICT_OUTPUTS = ("text", "jsonl", "csv")


def predict_command(
    weights: Path,
    paths: list[str],
    *,
    top_k: int = 5,
    output: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    on_bad_image: str = "error",
    workers: int = -1,
    stdin: IO[bytes] | None = None,
) -> int:
    """``ftsgd predict``: classify images and write one result per image to stdout as it is known.

    Args:
        weights: ``model.safetensors`` written by ftsgd, or the run directory holding it.
        paths: Image files, folders (walked recursively) and at most one ``-`` (paths from ``stdin``).
        top_k: Classes listed per image.
        output: ``text``, ``jsonl`` or ``csv``; None: text on a terminal, JSON Lines otherwise.
        batch_size: Images per forward pass (fewer when the input pauses).
        device: ``auto``, ``cpu`` or ``cuda``.
        on_bad_image: ``error``: an input that cannot be classified gets an error record and the
            command fails at the end; ``skip``: no record, only the count on stderr at the end.
        workers: Threads decoding images (-1 = automatic, 0 = in the main thread).
        stdin: Where ``-`` reads paths from (default: the process's standard input, as bytes).

    Returns:
        The number of inputs read.

    Raises:
        UsageError: Bad options, missing PATHs or folders without images, no such export (exit 2),
            before the model is loaded.
        RunError: Some inputs could not be classified with ``on_bad_image = "error"`` (exit 1), raised
            after every other input was classified.
    """
    if on_bad_image not in ("error", "skip"):
        raise UsageError(f"--on-bad-image must be error or skip, got {on_bad_image!r}")
    output = output or ("text" if console.stdout_is_tty() else "jsonl")
    if output not in PREDICT_OUTPUTS:
        raise UsageError(f"unknown output {output!r}; use {', '.join(PREDICT_OUTPUTS)}")
    check_sources(paths)
    predictor = Predictor(weights, device=device, top_k=top_k)
    ignored = IgnoredTally()
    items = iter_items(paths, stdin if stdin is not None else sys.stdin.buffer, ignored)
    stream = predictor.predict(items, batch_size=batch_size, workers=resolve_num_workers(workers))
    writer = PredictionWriter(output, predictor.top_k)
    tally = BadInputs()
    with closing(stream):
        for prediction in stream:
            tally.count(prediction)
            if prediction.error is None or on_bad_image == "error":
                writer.write(prediction)
    for message in ignored.messages(where="in the folders given"):
        console.warn(message)
    return tally.finish(on_bad_image)


class PredictionWriter:
    """Writes each result to stdout at once: JSON Lines, CSV (header first) or readable text lines."""

    def __init__(self, output: str, top_k: int) -> None:
        self.output, self.top_k = output, top_k
        self.csv = csv.writer(sys.stdout, lineterminator="\n") if output == "csv" else None
        if self.csv is not None:
            self.csv.writerow(csv_header(top_k))
            sys.stdout.flush()

    def write(self, p: Prediction) -> None:
        """One line per result, flushed, so a pipeline sees it before the next batch is done."""
        try:
            self._write(p)
        except UnicodeEncodeError:  # a file name that is not UTF-8, on a stdout that refuses its bytes
            self._write(replace(p, path=_displayable(p.path), error=p.error and _displayable(p.error)))
        sys.stdout.flush()

    def _write(self, p: Prediction) -> None:
        if self.csv is not None:
            self.csv.writerow(p.csv_row(self.top_k))
        elif self.output == "jsonl":
            line = json.dumps(p.record(), ensure_ascii=False)
            if _UNDECODED.search(line):  # a file name that is not UTF-8: keep the JSON valid UTF-8 with
                line = json.dumps(p.record())  # \udcXX escapes (os.fsencode(record["path"]) gives the bytes)
            sys.stdout.write(line + "\n")
        elif p.error is not None:
            sys.stdout.write(f"{p.path}  error: {p.error}\n")
        else:
            rest = ", ".join(
                f"{c} {100 * q:.1f}%" for c, q in zip(p.classes[1:], p.probabilities[1:], strict=True)
            )
            sys.stdout.write(
                f"{p.path}  {p.classes[0]} {100 * p.probabilities[0]:.1f}%{f'  ({rest})' if rest else ''}\n"
            )


_UNDECODED = re.compile("[\udc80-\udcff]")
"""How Python's file-system decoding keeps the bytes of a name that is not valid UTF-8 (surrogateescape)."""


def _displayable(text: str) -> str:
    """``text`` with the surrogate escapes of undecodable file-name bytes replaced by U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class BadInputs:
    """Counts inputs and failures (keeping only the first few paths: memory stays constant)."""

    SHOWN = 5

    def __init__(self) -> None:
        self.total = 0
        self.failed = 0
        self.first: list[str] = []

    def count(self, p: Prediction) -> None:
        self.total += 1
        if p.error is not None:
            self.failed += 1
            if len(self.first) < self.SHOWN:
                self.first.append(f"{p.path} ({p.error})")

    def finish(self, on_bad_image: str) -> int:
        """Report the failures on stderr (skip) or as the command's error (error); returns the total."""
        if self.total == 0:
            console.warn("no images to classify: stdin gave no paths")
        if not self.failed:
            return self.total
        more = f", ... and {self.failed - len(self.first)} more" if self.failed > len(self.first) else ""
        listed = "; ".join(self.first) + more
        if on_bad_image == "skip":
            console.warn(
                f"skipped {self.failed} of {self.total} input(s) that could not be classified: {listed}"
            )
            return self.total
        raise RunError(
            f"{self.failed} of {self.total} input(s) could not be classified (each has an error record in "
            f"the output; --on-bad-image skip leaves them out): {listed}"
        )
