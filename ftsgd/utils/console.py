"""Terminal output: rich tables on a terminal, plain lines in pipes and cron, JSON for scripts.

Everything the commands print goes through here so that the three output styles stay consistent:
``--json`` prints exactly one JSON object on stdout; a TTY gets rich tables and progress bars;
anything else (a cron job, ``| tee``) gets plain, greppable lines without colour codes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftsgd.utils.fileio import jsonable


def stdout_is_tty() -> bool:
    """Whether stdout is an interactive terminal (``FTSGD_FORCE_TTY=1`` pretends it is, for testing)."""
    if os.environ.get("FTSGD_FORCE_TTY") == "1":
        return True
    return sys.stdout.isatty()


def secondary_rank() -> bool:
    """Whether this is a process other than rank 0 of a ``torchrun`` job: it prints nothing but errors.

    Read from torchrun's environment (``RANK``, ``WORLD_SIZE``) so that every way of printing, the
    ``--json`` object included, appears once per job, not once per process.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def _rank_label() -> str:
    """``"[rank N] "`` in a multi-process job, so an error says which process it comes from."""
    try:
        many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        many = False
    return f"[rank {os.environ.get('RANK', '0')}] " if many else ""


def console(stderr: bool = False) -> Console:
    """A rich console that writes to the *current* sys.stdout/sys.stderr (CliRunner swaps them)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, force_terminal=stdout_is_tty() if not stderr else None, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (the contract of every ``--json`` flag)."""
    if secondary_rank():
        return
    sys.stdout.write(json.dumps(jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal, aligned plain text otherwise."""
    if secondary_rank():
        return
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    if stdout_is_tty():
        _print_rich_table(title, columns, cells)
        return
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    out = [title] if title else []
    out.append("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def _print_rich_table(title: str, columns: Sequence[str], cells: list[list[str]]) -> None:
    """A rich table when it fits the terminal; else one block per row, so no header or cell is cut.

    Rich shrinks a table that is too wide by cutting headers and cells (``opt…`` and ``tra…`` for two
    different keys); a narrow terminal gets every row as ``column: value`` lines instead, wrapped whole.
    """
    out = console()
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    if sum(widths) + 3 * len(columns) + 1 <= out.width:
        table = Table(title=Text(title), title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(Text(col), justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*(Text(c) for c in row))  # class names like "[cat]" are not rich markup
        out.print(table)
        return
    if title:
        out.print(Text(title, style="italic"))
    key_width = max(len(col) for col in columns)
    for row in cells:
        out.print(Text(f"{columns[0]}: {row[0]}", style="bold"))
        for col, cell in zip(columns[1:], row[1:], strict=True):
            line = Text(f"  {col + ':':<{key_width + 1}} {cell}")
            out.print(line, soft_wrap=False)
        out.print()


def print_kv(pairs: Sequence[tuple[str, Any]]) -> None:
    """Aligned ``key: value`` lines."""
    if secondary_rank():
        return
    width = max((len(k) for k, _ in pairs), default=0)
    text = "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)
    if stdout_is_tty():
        console().print(text, highlight=False, markup=False)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def info(message: str) -> None:
    """One plain informational line on stdout."""
    if secondary_rank():
        return
    if stdout_is_tty():
        console().print(message, highlight=False, markup=False)
    else:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def error(message: str) -> None:
    """An error for the user on stderr, without a traceback (every process of a job prints its own)."""
    sys.stderr.write(f"{_rank_label()}error: {message}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """A warning on stderr (kept off stdout so ``--json`` output stays parseable)."""
    if secondary_rank():
        return
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


class TrainingProgress:
    """Training progress: a rich bar on a terminal, a plain line per epoch (and every N steps) elsewhere.

    ``mode`` is ``"rich"``, ``"plain"`` or ``"quiet"``; :func:`training_progress` picks it.
    """

    def __init__(
        self,
        mode: str,
        *,
        epochs: int,
        steps_per_epoch: int,
        log_every: int = 50,
        select_by: str = "val.accuracy",
    ) -> None:
        self.mode = mode
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        self.select_by = select_by
        self._progress: Any = None
        self._task: Any = None
        self._clock: tuple[float, int] | None = None  # (time, global step) of the first step timed here

    def __enter__(self) -> TrainingProgress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
                TimeElapsedColumn(),
                TextColumn("run ETA {task.fields[eta]}"),
                console=console(),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start_epoch(self, epoch: int, start_step: int, lr: float) -> None:
        """Begin epoch ``epoch`` (0-based) at step ``start_step``."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(
                "train",
                total=self.steps_per_epoch,
                completed=start_step,
                epoch=epoch + 1,
                epochs=self.epochs,
                loss="-",
                lr=f"{lr:.3g}",
                ips="-",
                eta="-",
            )

    def step(self, epoch: int, step: int, loss: float, lr: float, images_per_s: float) -> None:
        """After optimizer step ``step`` (1-based within the epoch)."""
        eta = self._run_eta(epoch * self.steps_per_epoch + step)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=step,
                loss=f"{loss:.4f}",
                lr=f"{lr:.3g}",
                ips=f"{images_per_s:.0f}",
                eta=eta,
            )
        elif (
            self.mode == "plain"
            and self.log_every
            and step % self.log_every == 0
            and step < self.steps_per_epoch
        ):
            info(
                f"{_stamp()}epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch} "
                f"loss {loss:.4f} lr {lr:.3g} {images_per_s:.1f} img/s, run ETA {eta}"
            )

    def _run_eta(self, done: int) -> str:
        """Time left for the whole run (every epoch), from the pace of the steps timed in this process."""
        now = time.monotonic()
        if self._clock is None or done <= self._clock[1]:
            self._clock = (now, done)
            return "-"
        rate = (done - self._clock[1]) / max(now - self._clock[0], 1e-9)
        return _duration((self.epochs * self.steps_per_epoch - done) / rate)

    def end_epoch(self, record: dict[str, Any], best: bool) -> None:
        """One summary line per epoch (train loss/accuracy and every split's accuracy)."""
        if self.mode == "quiet":
            return
        lines = epoch_lines(record, self.epochs, best, self.select_by)
        if self._progress is not None:
            for line in lines:
                self._progress.console.print(line, highlight=False, markup=False)
        else:
            for line in lines:
                info(_stamp() + line)

    def message(self, text: str) -> None:
        """A status line (suppressed when quiet)."""
        if self.mode == "quiet":
            return
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            info(_stamp() + text)


LINE_WIDTH = 80
"""Epoch lines wrap below this, between fields, never inside a number."""


def epoch_lines(
    record: dict[str, Any], epochs: int, best: bool, select_by: str = "val.accuracy"
) -> list[str]:
    """An epoch's summary as lines of at most :data:`LINE_WIDTH` characters, broken between fields.

    Every split's accuracy, and the metric ``train.select_by`` names when it is not an accuracy (so ``(best)``
    can be checked against what chose it).
    """
    split_sel, _, metric = select_by.partition(".")
    fields = [
        f"epoch {record['epoch']}/{epochs}",
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}",
    ]
    for name, m in record["splits"].items():
        text = f"{name} acc {m['accuracy']:.4f}" if "accuracy" in m else name
        if name == split_sel and metric not in ("accuracy", "") and isinstance(m.get(metric), (int, float)):
            text += f" {metric} {m[metric]:.4f}"
        fields.append(text)
    fields.append(
        f"{record['images_per_s']:.1f} img/s {record['epoch_time_s']:.1f}s" + ("  (best)" if best else "")
    )
    lines, current = [], ""
    for field in fields:
        candidate = f"{current}  {field}" if current else field
        if current and len(candidate) > LINE_WIDTH:
            lines.append(current)
            candidate = "  " + field
        current = candidate
    return [*lines, current]


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _stamp() -> str:
    """The time in front of each plain progress line (logs of cron jobs need it)."""
    return time.strftime("%Y-%m-%d %H:%M:%S ")


def training_progress(
    quiet: bool, *, epochs: int, steps_per_epoch: int, select_by: str = "val.accuracy"
) -> TrainingProgress:
    """Pick rich, plain or quiet output for a training run."""
    mode = "quiet" if quiet or secondary_rank() else ("rich" if stdout_is_tty() else "plain")
    return TrainingProgress(mode, epochs=epochs, steps_per_epoch=steps_per_epoch, select_by=select_by)
