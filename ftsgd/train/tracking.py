"""Experiment tracking: TensorBoard event files in the run directory (``train.tensorboard = true``).

Written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package must be installed:
``pip install 'ftsgd[tensorboard]'``). Every scalar's step is the global optimizer step, so per-step and
per-epoch curves share one x-axis:

- ``train/loss``, ``train/accuracy``, ``train/lr``: the step's own batch, every ``train.tensorboard_every``
  steps;
- ``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/lr``, ``epoch/images_per_s``,
  ``epoch/epoch_time_s``, ``epoch/peak_memory_bytes``, ``epoch/epoch``: each epoch's line of
  ``metrics.jsonl``, at the epoch's last step;
- ``SPLIT/accuracy``, ``SPLIT/loss`` (and ``SPLIT/top5``) for every evaluated split, per epoch;
- the resolved recipe as text (``recipe``), once at the start of a run.

Resuming: a checkpoint at global step G holds everything logged at steps <= G (the writer is flushed
before every checkpoint). A resumed run opens a new event file with ``purge_step = G + 1``: TensorBoard's
readers then drop whatever the interrupted process logged after its checkpoint, and the resumed run logs
those steps again, so the curves hold each step once, with the values of an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EVENTS_GLOB", "TensorBoardLog", "epoch_scalars"]

EVENTS_GLOB = "events.out.tfevents.*"
"""TensorBoard event files (``events.out.tfevents.SECONDS.HOST.PID.N``) as SummaryWriter names them."""

_EPOCH_KEYS = (
    "train_loss",
    "train_accuracy",
    "lr",
    "images_per_s",
    "epoch_time_s",
    "peak_memory_bytes",
    "epoch",
)
_SPLIT_KEYS = ("accuracy", "loss", "top5", "macro_f1", "balanced_accuracy")


class TensorBoardLog:
    """A SummaryWriter for one run, or nothing at all until :meth:`open` is called (tracking off).

    Args:
        every: Log the per-step scalars every this many optimizer steps.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.writer: Any = None

    def open(self, path: Path, recipe_toml: str, *, resume_step: int | None) -> None:
        """Start an event file in ``path``; a new run logs ``recipe_toml``, a resumed one purges after its step.

        Args:
            path: The run directory.
            recipe_toml: The resolved recipe, logged as text by a new run.
            resume_step: The checkpoint's global step when resuming (None: a new run).
        """
        from torch.utils.tensorboard import SummaryWriter

        _wait_for_a_later_second(path)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("recipe", f"```toml\n{recipe_toml}```", global_step=0)
            self.writer.flush()

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        """The scalars of one optimizer step (``global_step`` counts from 1), every ``every`` steps."""
        if self.writer is None or global_step % self.every:
            return
        for tag, value in (("train/loss", loss), ("train/accuracy", accuracy), ("train/lr", lr)):
            self.writer.add_scalar(tag, value, global_step)

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record (a line of ``metrics.jsonl``) as scalars at the epoch's last step."""
        if self.writer is None:
            return
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        """Write what is buffered (before each checkpoint, so a checkpoint never runs ahead of the log)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one ``metrics.jsonl`` record."""
    scalars = {f"epoch/{key}": float(record[key]) for key in _EPOCH_KEYS if key in record}
    for split, metrics in record["splits"].items():
        scalars.update({f"{split}/{k}": float(metrics[k]) for k in _SPLIT_KEYS if k in metrics})
    return scalars


def _wait_for_a_later_second(path: Path) -> None:
    """Make sure a new event file sorts after the run's earlier ones.

    TensorBoard reads a directory's event files in name order, and a name starts with its creation
    second, then host name and process id. A resumed run whose file were created in the same second as
    the previous one (only plausible in tests) could sort before it, so its purge would come first and
    be lost; waiting for the next second (at most one) rules that out.
    """
    stamps = [int(p.name.split(".")[3]) for p in path.glob(EVENTS_GLOB) if p.name.split(".")[3].isdigit()]
    latest = max(stamps, default=0)
    if latest - time.time() > 2:  # a clock that went back: nothing to wait for reliably
        return
    while int(time.time()) <= latest:
        time.sleep(0.05)
