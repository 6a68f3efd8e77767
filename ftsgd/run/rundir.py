"""The run directory: writing its files, reading them back to resume, and the lock on it.

Which files a run directory holds, and their names, is :mod:`ftsgd.run.files`; :data:`RUN_FILES` adds
the exported model's two. What a command may do with a run directory (start it, resume it, start it
over) is decided in :mod:`ftsgd.run.resume`, under :func:`locked`.

Every file is written atomically (:mod:`ftsgd.utils.fileio`), so a kill at any moment leaves each one
either as it was or complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftsgd.data.scan import BadImage, skipped_lines
from ftsgd.errors import RecipeError, UsageError, first_line
from ftsgd.infer.export import CONFIG_NAME, WEIGHTS_NAME
from ftsgd.recipe.build import recipe_from_dict
from ftsgd.recipe.dump import recipe_to_toml
from ftsgd.recipe.schema import Recipe
from ftsgd.run.checks import environment_problems
from ftsgd.run.files import (
    BEFORE_FIRST_CHECKPOINT,
    CHECKPOINT,
    DATASET,
    LOCK,
    METRICS,
    RECIPE_FILE,
    SKIPPED_FILE,
    SPLIT,
    SUMMARY,
    TRACKING,
)
from ftsgd.utils.fileio import atomic_torch_save, atomic_write_text, jsonable, remove_stale_temps

__all__ = ["CHECKPOINT_FORMAT", "RUN_FILES", "RunDir", "lock_holder", "locked"]

CHECKPOINT_FORMAT = 1
RUN_FILES = (
    CHECKPOINT,
    WEIGHTS_NAME,
    METRICS,
    SUMMARY,
    SKIPPED_FILE,
    CONFIG_NAME,
    DATASET,
    SPLIT,
    RECIPE_FILE,
    TRACKING,
)
"""Every file ftsgd writes into a run directory (its lock aside): the run's own and the exported model's."""


_HELD: set[int] = set()
"""File descriptors of the run-directory locks this process holds (see :func:`_close_held_in_child`)."""


def _close_held_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors.

    An ``flock`` belongs to the open file description, which a fork shares: a worker that outlived a
    ``kill -9``-ed trainer (workers notice their parent is gone within about 5 s) would otherwise keep
    the run locked, and an immediate ``--resume`` would be refused as "in use" by the dead PID. Closing
    the child's copy leaves the parent's lock in place (never ``LOCK_UN`` here: that would unlock it for
    the parent too).
    """
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def locked(folder: Path, what: str = "run directory") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the duration of the block.

    ``flock`` on ``folder/.ftsgd.lock``: the kernel releases it when the holder exits or is killed, so a
    ``kill -9`` never leaves a stale lock. Forked children (DataLoader workers) close their copy of the
    descriptor at once, so workers that outlive a killed trainer for a few seconds do not keep holding
    it. A second process is refused at once (exit 2) with the
    PID and host of the holder. A folder this call created is removed again when the block fails before
    anything else was written into it, so a refused or failed start leaves nothing behind.

    Raises:
        UsageError: ``folder`` cannot be created or written, or another process holds the lock.
    """
    created = _make_folder(folder, what)
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write to the {what} {folder}: {exc.strerror or first_line(exc)}") from None
    try:
        _acquire(fd, path, what)
        _HELD.add(fd)
        yield
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= {LOCK}:
            with contextlib.suppress(OSError):
                path.unlink()
                folder.rmdir()
        raise
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def _make_folder(folder: Path, what: str) -> bool:
    """Create ``folder`` (and parents); whether it was created. Unusable places are a clear exit 2."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a directory")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = (
            "a parent is a file, not a folder"
            if exc.errno == errno.ENOTDIR
            else exc.strerror or first_line(exc)
        )
        raise UsageError(f"cannot create the {what} {folder}: {reason}; choose another --out") from None
    return created


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` if nobody holds it; whether it was taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock (``PID 12 on host``) when another process does, else None.

    A lock this process holds counts too: ``flock`` on a second descriptor conflicts with the first.
    """
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except OSError:
        return None  # no lock file: nobody ever held it
    try:
        if _try_lock(fd):
            return None
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the lock if it was taken


def _acquire(fd: int, path: Path, what: str) -> None:
    try:
        taken = _try_lock(fd)
    except OSError as exc:  # e.g. a file system without locks
        raise UsageError(f"cannot lock the {what} {path.parent}: {exc.strerror or first_line(exc)}") from None
    if not taken:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        raise UsageError(
            f"the {what} {path.parent} is in use by {holder}; wait for it to finish (or stop it), "
            "or choose another --out"
        )
    holder = f"PID {os.getpid()} on {socket.gethostname()}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
    except OSError as exc:
        raise UsageError(
            f"cannot write to the {what} {path.parent}: {exc.strerror or first_line(exc)}"
        ) from None


@dataclass(frozen=True)
class RunDir:
    """One run directory and the files in it."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def skipped(self) -> Path:
        return self.path / SKIPPED_FILE

    def entries(self) -> set[str]:
        """Names in the run directory, its lock file aside."""
        return {p.name for p in self.path.iterdir()} - {LOCK} if self.path.is_dir() else set()

    def status(self) -> str:
        """``new`` (missing or empty), ``unstarted`` (no checkpoint yet), ``unfinished`` or ``finished``."""
        if not self.entries():
            return "new"
        if (self.path / SUMMARY).is_file():
            return "finished"
        return "unfinished" if self.checkpoint.is_file() else "unstarted"

    def clear_unstarted(self) -> None:
        """Delete what a run wrote before its first checkpoint, so it can start over (nothing of value is lost).

        Raises:
            UsageError: the folder also holds files ftsgd did not write; they are never deleted.
        """
        foreign = sorted(
            n for n in self.entries() if n not in BEFORE_FIRST_CHECKPOINT and not n.endswith(".tmp")
        )
        if foreign:
            raise UsageError(
                f"run directory {self.path} never reached its first checkpoint, but it also holds "
                f"{', '.join(foreign[:5])}, which ftsgd did not write; choose another --out"
            )
        for name in self.entries():
            (self.path / name).unlink()

    def check_new(self) -> None:
        """Refuse an ``--out`` that is a file or a non-empty directory (a new run never mixes with old files)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if self.entries():
            hint = " (it holds a run: add --resume to continue it)" if self.recipe_file.exists() else ""
            raise UsageError(
                f"run directory {out} already exists and is not empty{hint}; choose another --out"
            )

    def start(self, recipe: Recipe) -> None:
        """Create the directory and write ``recipe.toml``, the first file of every run."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_file, recipe_to_toml(recipe))

    def read_recipe(self, data: Path, *, for_resume: bool = True) -> Recipe:
        """The run's own recipe, with ``data.root`` pointing at ``data`` (a dataset may move).

        For a resume (``for_resume``), a starting-weights file moved or deleted since is dropped from the
        recipe (the checkpoint holds every weight) and the recipe's paths and names are checked; otherwise
        the recipe is returned as it was written, to compare it with another one.
        """
        if not self.recipe_file.is_file():
            raise UsageError(f"cannot resume: {self.path} is not an ftsgd run directory (no {RECIPE_FILE})")
        try:
            raw = tomllib.loads(self.recipe_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot resume: {self.recipe_file} is corrupt ({exc})") from None
        raw.setdefault("data", {})["root"] = str(data.expanduser().resolve())
        model = raw.get("model")
        weights = model.get("weights") if isinstance(model, dict) else None
        if for_resume and weights and not Path(weights).expanduser().exists():
            model["weights"] = ""  # type: ignore[index]
        try:
            return recipe_from_dict(raw, environment_problems if for_resume else None)
        except RecipeError as exc:
            raise RecipeError(exc.problems, source=str(self.recipe_file)) from None

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` of a finished run."""
        try:
            return json.loads((self.path / SUMMARY).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"{self.path / SUMMARY} is unreadable ({first_line(exc)}); delete it to finish the run again"
            ) from None

    def read_dataset(self) -> dict[str, Any] | None:
        """The recorded data fingerprint (None for runs made before ftsgd recorded one)."""
        path = self.path / DATASET
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot resume: {path} is corrupt ({first_line(exc)})") from None

    def write_dataset(self, fingerprint: dict[str, Any]) -> None:
        """Record the data the run trains on (compact: one row per file)."""
        atomic_write_text(self.path / DATASET, json.dumps(fingerprint, separators=(",", ":")) + "\n")

    def read_split(self) -> dict[str, Any] | None:
        """The split the run drew from one folder of class folders (None for split folders)."""
        path = self.path / SPLIT
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"{path} is corrupt ({first_line(exc)}); it records the run's validation images"
            ) from None
        if not isinstance(record, dict):
            raise UsageError(f"{path} is corrupt (not a JSON object); it records the run's validation images")
        return record

    def write_split(self, record: dict[str, Any]) -> None:
        """Record the drawn split (compact: one row per file), once, when the run starts."""
        atomic_write_text(self.path / SPLIT, json.dumps(record, separators=(",", ":")) + "\n")

    def read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint to resume from, memory-mapped (weights are copied into the model page by page)."""
        path = self.checkpoint
        if not path.is_file():
            raise UsageError(
                f"cannot resume: {path} does not exist (the run wrote no checkpoint yet); start it again "
                f"without --resume into a new --out"
            )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise UsageError(f"cannot resume: {path} is corrupt or not an ftsgd checkpoint ({exc})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"cannot resume: {path} is not an ftsgd checkpoint (format {CHECKPOINT_FORMAT})")
        return ckpt

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` (``payload`` plus the format number) atomically."""
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload}, self.checkpoint)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """``metrics.jsonl``: one line per finished epoch, exactly the checkpoint's history."""
        text = "".join(json.dumps(jsonable(r)) + "\n" for r in history)
        atomic_write_text(self.path / METRICS, text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(jsonable(summary), indent=2) + "\n")

    def write_skipped(self, skipped: list[BadImage]) -> None:
        """List the images ``data.on_bad_image = "skip"`` left out; no file when none were (a fixed dataset)."""
        if skipped:
            atomic_write_text(self.skipped, skipped_lines(skipped))
        elif self.skipped.exists():
            self.skipped.unlink()

    def remove_stale_temps(self) -> None:
        """Delete temporaries of writes a kill -9 interrupted (a checkpoint-sized file each)."""
        remove_stale_temps(self.path, RUN_FILES)

    def resume_command(self, data: str) -> str:
        """The command line that continues this run."""
        return shlex.join(["ftsgd", "train", "--data", data, "--out", str(self.path), "--resume"])
