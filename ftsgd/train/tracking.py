"""Experiment tracking: what a run logs to TensorBoard, MLflow and Weights & Biases (``train.tracking``).

Torch-free (``ftsgd sweep`` reads :data:`GROUP_ENV` and :data:`TAGS_ENV` from here). One small
:class:`~ftsgd.train.tracking_base.Tracker` protocol, one implementation per tracker (:mod:`.tracking_tensorboard`,
:mod:`.tracking_mlflow`, :mod:`.tracking_wandb`), and :class:`Trackers`, which the Trainer talks to and which
fans each call out. Every tracker is fed from the same records, so what one shows the others show too:

- parameters: the resolved recipe, flattened (``optim.lr``, ``train.seed``, ...);
- per epoch, at the epoch's last global step: every number of the epoch's ``metrics.jsonl`` line
  (:func:`epoch_scalars`: ``epoch/train_loss``, ``epoch/lr``, ``epoch/images_per_s``,
  ``epoch/peak_memory_bytes``, ``SPLIT/accuracy``, ``SPLIT/loss``, ...). The names are derived from the
  record, not listed here, so a metric added to ``metrics.jsonl`` reaches every tracker unchanged;
- TensorBoard only: the per-step train loss/accuracy/lr every ``train.tensorboard_every`` steps;
- at the end: the summary's numbers (:func:`summary_scalars`) and the run's files (the exported model,
  its ``config.json``, ``summary.json``, ``recipe.toml``, plots when there are any).

Resuming continues the same tracker runs: their ids are kept in the run directory (``tracking.json``,
written atomically when a tracker run is created). Each tracker says, when it opens, the last global step
it already holds; the epochs of the checkpoint's history after that step are logged then (what the
killed process never got to log), and from then on only steps after the last one logged, so a run
killed at any moment and resumed shows each step once.

A tracker that fails (a server that refuses connections, a missing login, a full disk) never stops the
run: its exception is caught, one warning says so, and the run goes on with the other trackers and its
own files. Only rank 0 of a torchrun job logs (the Trainer opens the trackers there only).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from ftsgd.errors import Interrupted
from ftsgd.recipe.schema import Recipe, TrainConfig
from ftsgd.run.files import RECIPE_FILE, SUMMARY, TRACKING
from ftsgd.train.tracking_base import GROUP_ENV, TAGS_ENV, TrackedRun, Tracker
from ftsgd.utils.console import warn
from ftsgd.utils.fileio import atomic_write_text

__all__ = [
    "GROUP_ENV",
    "TAGS_ENV",
    "TrackedRun",
    "Tracker",
    "Trackers",
    "epoch_scalars",
    "summary_scalars",
]

_NOT_METRICS = ("step", "per_class")
"""Record entries that are no metric: the x-axis itself, and the per-class breakdown (many classes)."""


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The metric names and values of one ``metrics.jsonl`` record, every number in it.

    Top-level numbers become ``epoch/KEY`` (``epoch/train_loss``, ``epoch/lr``); each split's numbers
    ``SPLIT/KEY`` (``val/accuracy``, ``ood/loss``); another table's ``KEY/SUB``. Text, the step (the
    x-axis) and the per-class breakdown are left out.
    """
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_METRICS:
            continue
        if key == "splits" and isinstance(value, dict):
            for split, metrics in value.items():
                scalars.update(_numbers(metrics, split))
        elif isinstance(value, dict):
            scalars.update(_numbers(value, key))
        elif _is_number(value):
            scalars[f"epoch/{key}"] = float(value)
    return scalars


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's headline numbers: ``best/epoch``, ``best/value`` (of ``train.select_by``), every
    split's metrics at the best epoch (``best/val/accuracy``, ...), ``train_time_s`` and ``peak_memory_bytes``."""
    scalars = {"best/epoch": summary.get("best_epoch"), "best/value": summary.get("best_value")}
    scalars |= {k: summary.get(k) for k in ("train_time_s", "peak_memory_bytes", "steps")}
    out = {k: float(v) for k, v in scalars.items() if _is_number(v)}
    for split, metrics in (summary.get("best") or {}).items():
        out.update(_numbers(metrics, f"best/{split}"))
    return out


def _numbers(table: Any, prefix: str) -> dict[str, float]:
    """``prefix/KEY`` for every number in ``table`` (nested tables too), nothing for a non-table."""
    if not isinstance(table, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in table.items():
        if key in _NOT_METRICS:
            continue
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}/{key}"))
        elif _is_number(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _make(name: str, train: TrainConfig) -> Tracker:
    """The tracker named ``name`` (imported only when used: each needs its own optional package)."""
    if name == "tensorboard":
        from ftsgd.train.tracking_tensorboard import TensorBoardLog

        return TensorBoardLog(train.tensorboard_every)
    if name == "mlflow":
        from ftsgd.train.tracking_mlflow import MlflowTracker

        return MlflowTracker()
    from ftsgd.train.tracking_wandb import WandbTracker

    return WandbTracker()


class Trackers:
    """Every tracker of ``train.tracking``, as one; nothing at all until :meth:`open` is called.

    Args:
        train: The recipe's ``[train]`` section (``tracking`` and ``tensorboard_every``).
        quiet: Keep the trackers' own messages off the terminal (``--quiet``).
    """

    def __init__(self, train: TrainConfig, *, quiet: bool = False) -> None:
        self.names: list[str] = list(train.tracking)
        self.train, self.quiet = train, quiet
        self.active: dict[str, Tracker] = {}
        self.last_step: dict[str, int] = {}
        self._path: Path | None = None

    def open(
        self, path: Path, recipe: Recipe, *, resume_step: int | None, history: list[dict[str, Any]]
    ) -> None:
        """Start (or continue) every tracker of the run in ``path``, and log the epochs of ``history``
        each one does not hold yet."""
        self._path = path
        saved = self._read_ids()
        for name in self.names:
            tracker = self._call(name, _make, name, self.train)
            if tracker is None:
                continue
            run = TrackedRun(path, recipe, resume_step, saved.get(name, {}), self._remember(name), self.quiet)
            self.active[name] = tracker
            last = self._call(name, tracker.open, run)
            if last is None:
                continue
            self.last_step[name] = last
        for record in history:
            self.epoch(record)

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        for name, tracker in list(self.active.items()):
            self._call(name, tracker.step, global_step, loss, accuracy, lr)

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record (a line of ``metrics.jsonl``), to each tracker that does not hold its step yet."""
        step, scalars = int(record["step"]), epoch_scalars(record)
        for name, tracker in list(self.active.items()):
            if step > self.last_step.get(name, -1):
                self._call(name, tracker.epoch, step, scalars)
                self.last_step[name] = step

    def flush(self) -> None:
        """Make what was logged durable: a checkpoint never runs ahead of the trackers."""
        for name, tracker in list(self.active.items()):
            self._call(name, tracker.flush)

    def finish(self, summary: dict[str, Any]) -> None:
        """Log the summary and the run's files, and close every tracker as finished."""
        files = self._files()
        for name, tracker in list(self.active.items()):
            self._call(name, tracker.finish, summary, summary_scalars(summary), files)
        self.close("finished")

    def close(self, status: str = "paused") -> None:
        for name, tracker in list(self.active.items()):
            self._call(name, tracker.close, status)
        self.active.clear()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        paused = exc is None or isinstance(exc, Interrupted | KeyboardInterrupt)
        self.close("paused" if paused else "failed")

    def _files(self) -> list[Path]:
        """The run's files a tracker keeps: the exported model, its config, summary, recipe, any plots."""
        from ftsgd.infer.export import CONFIG_NAME, WEIGHTS_NAME  # here: this module stays torch-free

        if self._path is None:
            return []
        names = (WEIGHTS_NAME, CONFIG_NAME, SUMMARY, RECIPE_FILE)
        found = [self._path / n for n in names if (self._path / n).is_file()]
        return found + sorted(self._path.glob("*.png"))

    def _call(self, name: str, method: Any, *args: Any) -> Any:
        """``method(*args)``; an exception turns tracker ``name`` off with one warning and gives None."""
        try:
            return method(*args)
        except Exception as exc:  # a tracker never stops the run
            self.active.pop(name, None)
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            warn(
                f"train.tracking: {name} failed and is off for the rest of this run ({type(exc).__name__}: "
                f"{reason}); training goes on, metrics.jsonl and the other trackers keep everything"
            )
            return None

    def _read_ids(self) -> dict[str, Any]:
        """``tracking.json``: each tracker's ids from an earlier process of this run (empty when none)."""
        assert self._path is not None
        try:
            saved = json.loads((self._path / TRACKING).read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _remember(self, name: str) -> Any:
        def remember(ids: dict[str, Any]) -> None:
            assert self._path is not None
            saved = self._read_ids()
            saved[name] = ids
            atomic_write_text(self._path / TRACKING, json.dumps(saved, indent=2) + "\n")

        return remember
