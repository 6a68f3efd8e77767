"""TensorBoard event files in the run directory (``"tensorboard"`` in ``train.tracking``).

Written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package must be installed:
``pip install 'ftsgd[tensorboard]'``). Every scalar's step is the global optimizer step, so per-step and
per-epoch curves share one x-axis:

- ``train/loss``, ``train/accuracy``, ``train/lr``: the step's own batch, every ``train.tensorboard_every``
  steps;
- every number of each epoch's line of ``metrics.jsonl`` (:func:`ftsgd.train.tracking.epoch_scalars`:
  ``epoch/train_loss``, ``epoch/lr``, ``epoch/images_per_s``, ``epoch/peak_memory_bytes``, ``SPLIT/accuracy``,
  ``SPLIT/loss``, ...), at the epoch's last step;
- the resolved recipe as text (``recipe``), once at the start of a run.

Resuming: a checkpoint at global step G holds everything logged at steps <= G (the writer is flushed
before every checkpoint). A resumed run opens a new event file with ``purge_step = G + 1``: TensorBoard's
readers then drop whatever the interrupted process logged after its checkpoint, and the resumed run logs
those steps again, so the curves hold each step once, with the values of an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ftsgd.train.tracking_base import TrackedRun

__all__ = ["EVENTS_GLOB", "TensorBoardLog"]

EVENTS_GLOB = "events.out.tfevents.*"
"""TensorBoard event files (``events.out.tfevents.SECONDS.HOST.PID.N``) as SummaryWriter names them."""


class TensorBoardLog:
    """A SummaryWriter for one run (a :class:`ftsgd.train.tracking_base.Tracker`).

    Args:
        every: Log the per-step scalars every this many optimizer steps.
    """

    name: ClassVar[str] = "tensorboard"

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.writer: Any = None

    def open(self, run: TrackedRun) -> int:
        """Start an event file in the run directory; a new run logs its recipe, a resumed one purges after its step.

        Returns:
            The checkpoint's step when resuming (the event files hold everything up to it), else -1.
        """
        from torch.utils.tensorboard import SummaryWriter

        _wait_for_a_later_second(run.path)
        purge = None if run.resume_step is None else run.resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run.path), purge_step=purge)
        if run.resume_step is None:
            self.writer.add_text("recipe", f"```toml\n{run.recipe_toml}```", global_step=0)
            self.writer.flush()
            return -1
        return run.resume_step

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        """The scalars of one optimizer step (``global_step`` counts from 1), every ``every`` steps."""
        if self.writer is None or global_step % self.every:
            return
        for tag, value in (("train/loss", loss), ("train/accuracy", accuracy), ("train/lr", lr)):
            self.writer.add_scalar(tag, value, global_step)

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write what is buffered (before each checkpoint, so a checkpoint never runs ahead of the log)."""
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any], scalars: dict[str, float], files: list[Path]) -> None:
        """Nothing more: the event files sit beside the run's own files."""

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
