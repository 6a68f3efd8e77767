"""Atomic writes: the target always holds the old or the new contents, never a broken file."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _zygote as zygote
import pytest
import torch

from ftsgd.errors import RunError
from ftsgd.utils import fileio


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def disk_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write through the atomic writer stores a few bytes and then fails with ENOSPC."""

    def write(self: fileio._RecordingFile, data: bytes) -> int:
        self._fh.write(bytes(data)[:3])
        exc = _enospc()
        if self.error is None:
            self.error = exc
        raise exc

    monkeypatch.setattr(fileio._RecordingFile, "write", write)


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    fileio.atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"
    fileio.atomic_write_bytes(str(target), b"new contents")
    assert target.read_bytes() == b"new contents"
    fileio.atomic_write_text(tmp_path / "t.json", '{"é": 1}\n')
    assert (tmp_path / "t.json").read_text(encoding="utf-8") == '{"é": 1}\n'
    assert _leftovers(tmp_path) == []


def test_new_files_get_normal_permissions_and_replacements_keep_theirs(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    fileio.atomic_write_text(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == fileio._NEW_FILE_MODE  # not mkstemp's 0o600
    target.chmod(0o640)
    fileio.atomic_write_text(target, "y")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_torch_and_safetensors_roundtrip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    obj = {"step": 3, "w": torch.arange(6.0).reshape(2, 3)}
    fileio.atomic_torch_save(obj, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], obj["w"])

    fileio.atomic_save_safetensors({"w": obj["w"]}, tmp_path / "m.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(tmp_path / "m.safetensors")["w"], obj["w"])
    assert _leftovers(tmp_path) == []


@pytest.mark.usefixtures("disk_fills_up")
@pytest.mark.parametrize("kind", ["bytes", "text", "torch"])
def test_disk_full_keeps_previous_file_and_leaves_no_temp(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out.file"
    target.write_bytes(b"previous")
    with pytest.raises(RunError) as info:
        if kind == "bytes":
            fileio.atomic_write_bytes(target, b"x" * 10_000)
        elif kind == "text":
            fileio.atomic_write_text(target, "x" * 10_000)
        else:
            # torch.save hides the OSError behind an opaque RuntimeError; the real cause must surface
            fileio.atomic_torch_save({"w": torch.zeros(1000)}, target)
    assert (
        str(info.value) == f"could not write {target}: No space left on device; the previous file is intact"
    )
    assert info.value.exit_code == 1
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_enospc_at_fsync_or_replace_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.txt"
    target.write_text("previous")
    for name in ("fsync", "replace"):
        with monkeypatch.context() as patch:

            def fail(*_args: object, **_kwargs: object) -> None:
                raise _enospc()

            patch.setattr(fileio.os, name, fail)
            with pytest.raises(RunError, match="No space left on device; the previous file is intact"):
                fileio.atomic_write_text(target, "new")
        assert target.read_text() == "previous"
        assert _leftovers(tmp_path) == []


def test_safetensors_io_error_becomes_run_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch

    def save_file(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(
        RunError, match=r"could not write .*No space left on device.*the previous file is intact"
    ):
        fileio.atomic_save_safetensors({"w": torch.zeros(2)}, target)
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_failure_on_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "f.txt"
    with pytest.raises(RunError, match=r"could not write .*f\.txt: No such file or directory"):
        fileio.atomic_write_text(target, "x")
    assert not target.parent.exists()


def test_programming_errors_are_not_disguised_as_io_errors(tmp_path: Path) -> None:
    target = tmp_path / "ck.pt"
    with pytest.raises(Exception) as info:
        fileio.atomic_torch_save({"f": lambda: 0}, target)  # lambdas cannot be pickled
    assert not isinstance(info.value, RunError)
    assert not target.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_mid_write_leaves_old_or_new_file(tmp_path: Path) -> None:
    """A writer killed at arbitrary moments never leaves a mixed or short target file."""
    target = tmp_path / "big.bin"
    size = 4 * 2**20
    script = textwrap.dedent(
        f"""
        import sys
        from ftsgd.utils.fileio import atomic_write_bytes
        print("ready", flush=True)
        i = 0
        while True:
            atomic_write_bytes({str(target)!r}, (b"ab"[i % 2:i % 2 + 1]) * {size})
            i += 1
        """
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for delay in (0.05, 0.13, 0.21):
        proc = zygote.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if target.exists():
            data = target.read_bytes()
            assert len(data) == size and data in (b"a" * size, b"b" * size)


def test_jsonable_makes_strict_json() -> None:
    data = {"a": (1, 2), "b": {3}, "c": Path("/x"), "d": float("nan"), "e": [float("inf"), 1.5], 4: "k"}
    assert fileio.jsonable(data) == {"a": [1, 2], "b": [3], "c": "/x", "d": None, "e": [None, 1.5], "4": "k"}


def test_a_temporary_in_use_survives_the_cleanup_and_a_dead_writer_s_does_not(tmp_path: Path) -> None:
    """Every export removes what a killed export left, never what a live writer is writing."""
    from ftsgd.utils.fileio import _atomic_write, remove_stale_temps

    dead = tmp_path / ".model.onnx.dead1.tmp"
    dead.write_bytes(b"half a model")
    seen: list[list[Path]] = []

    def write(fh, tmp: Path) -> None:
        fh.write(b"new")
        seen.append(remove_stale_temps(tmp_path, ["model.onnx"]))  # another export starting meanwhile
        assert tmp.exists()

    _atomic_write(tmp_path / "model.onnx", write)
    assert seen == [[dead]] and not dead.exists()
    assert (tmp_path / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
