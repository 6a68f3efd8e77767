"""Crash-safe file writes: a kill at any moment leaves either the old file or the new one.

Every writer follows the same protocol: write to a temporary file in the *same directory* as the
target (so the final rename never crosses a filesystem), flush, ``os.fsync`` the data, ``os.replace``
it over the target (atomic on POSIX and Windows), then ``fsync`` the directory so the rename itself
survives a power cut. A half-written temporary is the only thing a crash can leave behind, and it
never has the target's name.

I/O failures (disk full, quota, permissions, a vanished directory) become
:class:`ftsgd.errors.RunError` with a message that says which file and that the previous version is
untouched, after the temporary has been removed, so a long run that fails to save a checkpoint does
not also lose the last good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ftsgd.errors import RunError

if TYPE_CHECKING:  # torch is imported lazily: writing a JSON file should not cost a torch import
    import torch

__all__ = [
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with",
    "jsonable",
    "remove_stale_temps",
]


def _default_file_mode() -> int:
    """Mode a plain ``open(path, "w")`` would give a new file (0o666 minus the umask).

    ``mkstemp`` creates files as 0o600; without this, exported weights would silently become
    unreadable to other users sharing a results directory.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _default_file_mode()


class _RecordingFile:
    """Binary file proxy that remembers the first ``OSError`` raised by ``write``.

    ``torch.save`` turns a failed write (e.g. ENOSPC) into an opaque ``RuntimeError`` from its C++ zip
    writer ("unexpected pos 704 vs 598"); recording the real error lets us report "No space left on
    device" instead.
    """

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def seekable(self) -> bool:
        return self._fh.seekable()


def _reason(exc: BaseException) -> str:
    """Short human-readable cause of an I/O failure ("No space left on device")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _write_error(path: Path, exc: BaseException, existed: bool) -> RunError:
    tail = "the previous file is intact" if existed else "no partial file was left behind"
    return RunError(f"could not write {path}: {_reason(exc)}; {tail}")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by syncing its directory; not supported (nor needed) on Windows."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path | str, write: Callable[[IO[bytes], Path], None]) -> None:
    """Run ``write(file, temp_path)`` against a temporary file, then atomically move it to ``path``.

    ``write`` may either write to the open binary ``file`` or (for libraries that only take a file
    name) write to ``temp_path`` directly; both end up fsynced before the rename.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    existed = path.exists()
    tmp: Path | None = None
    recorder: _RecordingFile | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "r+b") as fh:
            # Held until the rename: remove_stale_temps leaves a temporary alone while its writer lives.
            fcntl.flock(fd, fcntl.LOCK_EX)
            recorder = _RecordingFile(fh)
            write(recorder, tmp)  # type: ignore[arg-type]
            fh.flush()
            # A writer that used the path wrote through its own descriptor; fsync covers the inode
            # either way, so syncing ours is enough.
            os.fsync(fh.fileno())
            mode = (path.stat().st_mode & 0o7777) if existed else _NEW_FILE_MODE
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            tmp = None
        _fsync_dir(directory)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        recorded = recorder.error if recorder is not None else None
        if recorded is not None:
            raise _write_error(path, recorded, existed) from exc
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            # SafetensorError is raised by the Rust writer for I/O failures ("No space left on
            # device (os error 28)"); argument problems are rejected in Python before any write.
            raise _write_error(path, exc, existed) from exc
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``.

    Args:
        path: Target file; its directory must exist.
        data: The complete new contents.

    Raises:
        RunError: The write failed; ``path`` still holds its previous contents (or does not exist).
    """

    def write(fh: IO[bytes], _tmp: Path) -> None:
        fh.write(data)

    _atomic_write(path, write)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Atomically replace ``path`` with ``text`` encoded as UTF-8 (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (resumable checkpoints must never be half-written).

    Raises:
        RunError: The write failed; the previous checkpoint is untouched.
    """

    import torch

    def write(fh: IO[bytes], _tmp: Path) -> None:
        torch.save(obj, fh)

    _atomic_write(path, write)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: Path | str,
    metadata: dict[str, str] | None = None,
    float_dtype: torch.dtype | None = None,
    replace: dict[str, Callable[[], torch.Tensor]] | None = None,
) -> None:
    """Save ``tensors`` as a safetensors file atomically.

    The tensors must already be contiguous and must not share storage (safetensors refuses both);
    :func:`ftsgd.export.export_model` prepares them. With ``float_dtype`` every floating-point tensor
    is written in that dtype, cast one tensor at a time (:mod:`ftsgd.utils.tensorfile`). ``replace``
    gives some tensors as functions, each called as its turn to be written comes.

    Raises:
        RunError: The write failed; the previous file is untouched.
    """
    from safetensors.torch import save_file

    def write(fh: IO[bytes], tmp: Path) -> None:
        if float_dtype is not None or replace:
            from ftsgd.utils.tensorfile import write_safetensors

            write_safetensors(fh, tensors, metadata, float_dtype, replace)
            return
        # save_file streams tensor by tensor; serialising to one bytes object first would double
        # peak memory for multi-gigabyte models.
        save_file(tensors, str(tmp), metadata=metadata)

    _atomic_write(path, write)


def atomic_write_with(path: Path | str, write: Callable[[Path], None]) -> None:
    """Atomically create or replace ``path`` with a writer that only takes a file name.

    For libraries that write files themselves (an ONNX model's ``save``). ``write(temp_path)`` may
    also check what it wrote and raise: the temporary is then removed and ``path`` stays as it was, so
    a file that failed its check is never put in place.

    Raises:
        RunError: The write failed; the previous file is untouched. Exceptions ``write`` raises for
            other reasons pass through (after the temporary is removed).
    """

    def run(_fh: IO[bytes], tmp: Path) -> None:
        write(tmp)

    _atomic_write(path, run)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: tuples and sets become lists, paths strings, non-finite floats ``None``.

    ``json.dumps`` would write ``NaN``/``Infinity``, which is not JSON and breaks strict readers (``jq``,
    JavaScript), so a diverged metric is written as ``null`` instead.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    return obj


def remove_stale_temps(directory: Path | str, names: list[str] | tuple[str, ...]) -> list[Path]:
    """Delete temporaries a killed writer left next to ``names`` in ``directory`` (``.NAME.*.tmp``).

    A ``kill -9`` during an atomic write leaves its temporary behind (never the target); for a
    checkpoint or an export that is a model-sized file, so a resumed run and every export remove them.
    Only names this module would have created for the given targets are touched, and only when no live
    writer holds them (each writer keeps an ``flock`` on its temporary until the rename).

    Returns:
        The files removed.
    """
    directory = Path(directory)
    removed = []
    for name in names:
        for tmp in directory.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a writer is at work
                    tmp.unlink()
                    removed.append(tmp)
                finally:
                    os.close(fd)
    return removed
