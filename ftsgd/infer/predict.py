"""Classifying new images with an exported model, one result per image as soon as it is known.

``ftsgd predict`` is meant for pipelines (``find new/ -name '*.jpg' | ftsgd predict RUN -``, a cron job
over a drop folder), so three properties matter more than raw speed:

* **Constant memory.** Paths are produced lazily (stdin line by line, folders one directory listing at
  a time) by a reader thread into a bounded queue; images are decoded by a few threads with a bounded
  number of batches in flight; every result leaves as soon as its batch is classified. Nothing grows
  with the number of inputs.
* **Results as they come, in input order.** A batch is cut short when the input pauses, so a path
  written to stdin gets its answer without waiting for a full batch or for stdin to close; results
  (error records included) keep the order of the inputs whatever the number of decoding threads.
* **The predictions of ``ftsgd eval``.** The export's own preprocessing
  (:func:`ftsgd.export.inference_transform`) and the same forward pass
  (:func:`ftsgd.evaluate.logits_of`, float32), and the same tie-break as its ``argmax``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ftsgd.data.folders import IMG_EXTENSIONS, iter_image_files
from ftsgd.data.ignored import IgnoredTally
from ftsgd.data.images import load_image
from ftsgd.data.scan import check_image
from ftsgd.errors import FtsgdError, RunError, UsageError, first_line
from ftsgd.infer.evaluate import logits_of
from ftsgd.infer.export import inference_transform, load_exported_model
from ftsgd.utils.device import resolve_device

__all__ = ["STDIN", "Item", "Prediction", "Predictor", "check_sources", "csv_header", "iter_items"]

STDIN = "-"
"""The PATH argument that means: read paths from standard input, one per line."""


@dataclass(frozen=True)
class Item:
    """One input image: its path as given (or as found under a given folder), and why it is unusable."""

    path: str
    error: str | None = None


@dataclass(frozen=True)
class Prediction:
    """The result for one input: the top-k classes and their probabilities (best first), or an error."""

    path: str
    classes: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """The JSON Lines object: ``path``, ``class``, ``probability``, ``top_k`` -- or ``path``, ``error``."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "class": self.classes[0],
            "probability": self.probabilities[0],
            "top_k": [
                {"class": c, "probability": p} for c, p in zip(self.classes, self.probabilities, strict=True)
            ],
        }

    def csv_row(self, k: int) -> list[str]:
        """The CSV row matching :func:`csv_header` for top-``k``: empty class cells on an error row."""
        if self.error is not None:
            return [self.path, *[""] * (2 * k), self.error]
        cells = [self.path]
        for c, p in zip(self.classes, self.probabilities, strict=True):
            cells += [c, f"{p:.6f}"]
        return cells + [""] * (2 * (k - len(self.classes))) + [""]


def csv_header(k: int) -> list[str]:
    """``path, top1_class, top1_probability, ..., topK_class, topK_probability, error``.

    Ranked names, not ``class_2``: a dataset may well have a class called ``class_2``.
    """
    ranked = [name for i in range(1, k + 1) for name in (f"top{i}_class", f"top{i}_probability")]
    return ["path", *ranked, "error"]


# ------------------------------------------------------------------------------------------ inputs


def check_sources(sources: list[str]) -> None:
    """Refuse, before the model is loaded, PATH arguments that can never give a result (exit code 2).

    Paths read from stdin are not checked here: one that is missing becomes an error record in the
    output, like an unreadable image.
    """
    if not sources:
        raise UsageError("no inputs: give image files, folders, or - to read paths from stdin")
    if sources.count(STDIN) > 1:
        raise UsageError("- (read paths from stdin) may be given only once")
    problems = []
    for source in sources:
        if source == STDIN:
            continue
        if not os.path.exists(source):
            problems.append(f"{source}: no such file or folder")
        elif os.path.isdir(source) and next(iter_image_files(source, on_error=_ignore), None) is None:
            problems.append(f"{source}: a folder without image files ({', '.join(IMG_EXTENSIONS)})")
    if problems:
        raise UsageError("nothing to classify in:\n" + "\n".join(f"  - {p}" for p in problems))


def _ignore(_exc: OSError) -> None:
    """Unlistable sub-folders are reported while predicting; the pre-check only looks for one image."""


def iter_items(sources: list[str], stdin: IO[bytes], ignored: IgnoredTally | None = None) -> Iterator[Item]:
    """Every input image, lazily, in order: files as given, folders walked, stdin read line by line.

    A file named directly (or on stdin) is always classified, whatever its extension; a folder
    contributes its image files by the rules of a dataset's class folders
    (:func:`ftsgd.data.iter_image_files`), and what it leaves out is counted in ``ignored``. Stdin is
    read as bytes and decoded like the OS decodes file names, so any name round-trips; empty lines are
    skipped.
    """
    for source in sources:
        if source != STDIN:
            yield from _expand(source, ignored)
            continue
        for line in stdin:
            path = os.fsdecode(line.rstrip(b"\r\n"))
            if path:
                yield from _expand(path, ignored)


def _expand(path: str, ignored: IgnoredTally | None) -> Iterator[Item]:
    """A file as one item; a folder as its image files, plus an error item per sub-folder it cannot list."""
    if not os.path.isdir(path):
        yield Item(path)
        return
    unlisted: list[OSError] = []
    on_ignored = ignored.add if ignored is not None else None
    for file in iter_image_files(path, on_error=unlisted.append, on_ignored=on_ignored):
        yield from _listing_errors(unlisted)
        yield Item(str(file))
    yield from _listing_errors(unlisted)


def _listing_errors(unlisted: list[OSError]) -> Iterator[Item]:
    while unlisted:
        exc = unlisted.pop(0)
        yield Item(str(exc.filename), f"cannot list folder: {exc.strerror or first_line(exc)}")


class _End:
    """Put in the input queue after the last item (with the reader's exception, if it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class InputQueue:
    """The inputs, read ahead by a daemon thread into a bounded queue.

    The thread lets a batch be cut short when the input pauses (a path arriving on stdin is answered
    at once); the bound keeps memory constant however many paths there are.
    """

    def __init__(self, items: Iterator[Item], maxsize: int) -> None:
        self._queue: queue.Queue[Item | _End] = queue.Queue(maxsize)
        self._done = False
        self._closed = threading.Event()
        threading.Thread(target=self._fill, args=(items,), daemon=True, name="ftsgd-predict-input").start()

    def _fill(self, items: Iterator[Item]) -> None:
        try:
            for item in items:
                if self._closed.is_set():
                    return
                self._queue.put(item)
        except BaseException as exc:  # e.g. stdin became unreadable: the main thread re-raises it
            self._queue.put(_End(exc))
            return
        self._queue.put(_End())

    def close(self) -> None:
        """Stop reading ahead (the consumer stopped early): the thread ends at its next item."""
        self._closed.set()
        while True:  # unblock a put() waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def take(self, n: int, *, wait: bool) -> list[Item] | None:
        """Up to ``n`` items; None once every input has been taken.

        Args:
            n: Batch size.
            wait: Block for the first item, then take only what is already queued (a short batch
                when the input pauses). Without it, return ``[]`` unless a full batch is queued.
        """
        if self._done:
            return None
        if not wait and self._queue.qsize() < n:
            return []
        batch: list[Item] = []
        while len(batch) < n:
            try:
                entry = self._queue.get(block=not batch)
            except queue.Empty:
                break
            if isinstance(entry, _End):
                self._done = True
                if isinstance(entry.error, FtsgdError):
                    raise entry.error
                if entry.error is not None:
                    raise RunError(f"reading the inputs failed: {first_line(entry.error)}") from entry.error
                break
            batch.append(entry)
        return batch if batch or not self._done else None


# ------------------------------------------------------------------------------------------ model


def load_batch(
    items: list[Item], transform: Callable[[Any], torch.Tensor]
) -> tuple[list[Item], torch.Tensor | None]:
    """Decode and preprocess a batch; an item that fails comes back with its error set.

    Returns:
        The items (in order) and the stacked images of those without an error (None if there are none).
    """
    out: list[Item] = []
    images: list[torch.Tensor] = []
    for item in items:
        if item.error is None:
            try:
                images.append(transform(load_image(Path(item.path))))
            except Exception as exc:
                found = check_image(item.path)
                item = Item(
                    item.path,
                    f"{found[0]}: {found[1]}" if found else f"{type(exc).__name__}: {first_line(exc)}",
                )
        out.append(item)
    return out, (torch.stack(images) if images else None)


class Predictor:
    """An exported model ready to classify: weights, class names, preprocessing and device.

    Args:
        weights: ``model.safetensors`` written by ftsgd, or the run directory holding it.
        device: ``auto``, ``cpu`` or ``cuda``.
        top_k: How many classes each result lists (at most the number of classes).
    """

    def __init__(self, weights: Path, *, device: str = "auto", top_k: int = 5) -> None:
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        self.model, self.meta = load_exported_model(weights)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.transform = inference_transform(self.meta)
        self.top_k = min(top_k, len(self.class_names))

    def classify(self, images: torch.Tensor) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
        """The top-k classes and softmax probabilities of each image of a batch, best first.

        Classes are ranked by a stable sort of the logits, so the first one is exactly ``argmax``'s
        (the first of equal maxima), which is what ``ftsgd eval`` counts as the prediction.
        """
        logits = logits_of(self.model, images, device=self.device)
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        probs = logits.softmax(dim=1).gather(1, order)
        indices, values = order.tolist(), probs.double().tolist()
        return [
            (tuple(self.class_names[i] for i in row), tuple(round(p, 6) for p in ps))
            for row, ps in zip(indices, values, strict=True)
        ]

    def predict(
        self, items: Iterator[Item], *, batch_size: int = 64, workers: int = 0
    ) -> Iterator[Prediction]:
        """Classify a stream of inputs, yielding one :class:`Prediction` per input in input order.

        At most ``workers + 1`` batches are decoded ahead of the model (``workers`` threads; 0 decodes
        in this thread) and at most ``batch_size * (workers + 2)`` paths are read ahead.
        """
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        inputs = InputQueue(items, maxsize=batch_size * (workers + 2))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="ftsgd-decode") if workers else None
        pending: deque[Future[tuple[list[Item], torch.Tensor | None]]] = deque()
        try:
            while True:
                batch = inputs.take(batch_size, wait=not pending) if len(pending) <= workers else []
                if batch:
                    pending.append(self._submit(pool, batch))
                elif pending:
                    yield from self._results(*pending.popleft().result())
                elif batch is None:
                    return
        finally:
            inputs.close()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _submit(
        self, pool: ThreadPoolExecutor | None, batch: list[Item]
    ) -> Future[tuple[list[Item], torch.Tensor | None]]:
        if pool is not None:
            return pool.submit(load_batch, batch, self.transform)
        done: Future[tuple[list[Item], torch.Tensor | None]] = Future()
        done.set_result(load_batch(batch, self.transform))
        return done

    def _results(self, items: list[Item], images: torch.Tensor | None) -> Iterator[Prediction]:
        ranked = iter(self.classify(images) if images is not None else [])
        for item in items:
            if item.error is not None:
                yield Prediction(item.path, error=item.error)
            else:
                classes, probabilities = next(ranked)
                yield Prediction(item.path, classes, probabilities)
