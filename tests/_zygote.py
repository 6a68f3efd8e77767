"""Real ``ftsgd`` processes for the tests without paying for a fresh interpreter each time.

Starting ``python -m ftsgd`` costs 5.5-6.5 s of CPU on the 2-core test machine, nearly all of it importing
torch, torchvision (which imports ``torch._dynamo``) and timm; a tiny test run trains in well under a
second. Tests about what only a separate process shows (SIGKILL at any moment, signals, exit codes, locks
held by another PID, closed pipes, DataLoader workers) started dozens of them.

This module keeps one *zygote* per test worker: an interpreter that has imported all of that once and
then ``fork()``s a child per request. The child is a real process with its own PID, session and process
group (``setsid``), the caller's stdin/stdout/stderr file descriptors (passed over a Unix socket with
``SCM_RIGHTS``), environment and working directory; it runs the requested script or module as
``python`` would (``-m MODULE``, ``-c CODE`` or ``SCRIPT``) and exits with its status. Signals sent by the
test reach it directly; its exit status (a negative number for a signal, as :class:`subprocess.Popen`
gives) is reported back by the zygote, which is its parent.

:func:`Popen` and :func:`run` take :mod:`subprocess`'s arguments. Only commands that start with this
interpreter (``sys.executable``) go to the zygote; anything else (``torchrun`` jobs, the console script,
shell commands) runs as a normal subprocess, as do tests that are about the interpreter's own start.

What differs from a fresh interpreter, and why it does not matter here: modules are already imported
(ftsgd reads its environment at run time, not import time), and torch's intra-op thread count is set
from ``OMP_NUM_THREADS`` explicitly, since torch read it once in the zygote.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the real interpreter, whatever a test later sets sys.executable to
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
_PRELOAD = (
    "torch",
    "timm",
    "ftsgd.cli.app",
    "ftsgd.train.trainer",
    "ftsgd.sweep.command",
    "safetensors.torch",
)


# ----------------------------------------------------------------------------- the zygote process


def _serve(path: str) -> None:
    """Import the heavy modules, then fork one child per connection until the socket is removed."""
    for name in _PRELOAD:
        __import__(name)
    sys.path.insert(0, str(REPO / "tests"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of pytest is for pytest
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    watched: dict[Any, int] = {}
    while os.path.exists(path) or children:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                inherited = [listener.fileno(), wake_r, wake_w, *(c.fileno() for c in children.values())]
                spawned = _spawn(conn, inherited)
                if spawned is None:  # the caller went away before its request arrived (killed at once)
                    conn.close()
                    continue
                pid, watch = spawned
                children[pid] = conn
                if watch:
                    watched[conn] = pid
                    sel.register(conn, selectors.EVENT_READ)
            elif key.fileobj in watched:
                _orphaned(key.fileobj, watched, children, sel)
            else:
                os.read(wake_r, 4096)
        _reap(children, watched, sel)


def _orphaned(conn: Any, watched: dict, children: dict, sel: selectors.BaseSelector) -> None:
    """A stand-in (:mod:`_zygote_client`) went away before its process ended: it was killed, so kill that too."""
    with contextlib.suppress(OSError):
        if conn.recv(1, socket.MSG_PEEK):
            return
    pid = watched.pop(conn)
    sel.unregister(conn)
    if pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # not its own group leader yet (killed before setsid): the process alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _reap(children: dict[int, socket.socket], watched: dict, sel: selectors.BaseSelector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn in watched:
            del watched[conn]
            sel.unregister(conn)
        if conn is not None:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack("!i", code))
            conn.close()


def _spawn(conn: socket.socket, inherited: list[int]) -> tuple[int, bool] | None:
    """Read one request from ``conn`` and fork its child, which closes the zygote's ``inherited`` descriptors.

    Returns the child's PID in the zygote, and whether the caller is a stand-in whose end means "kill it".
    """
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
    except (OSError, ValueError):
        return None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(struct.pack("!i", pid))
        except OSError:  # the caller was killed while waiting for its process: that goes too
            os.kill(pid, signal.SIGKILL)
        return pid, bool(request.get("watch"))
    try:
        signal.set_wakeup_fd(-1)
        conn.close()
        for fd in inherited:
            os.close(fd)
        for sig in (
            signal.SIGCHLD,
            signal.SIGTERM,
            signal.SIGUSR1,
        ):  # SIGPIPE stays ignored, as Python starts
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        _child(request, fds)
    finally:
        os._exit(70)  # never reached unless _child itself failed


def _child(request: dict[str, Any], fds: list[int]) -> None:
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # What the process would see as its interpreter: the stand-in, where a test runs commands through it.
    sys.executable = request["env"].get("FTSGD_TEST_EXECUTABLE", PYTHON)
    if "OMP_NUM_THREADS" in request["env"]:
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    code = _run_main(request["argv"])
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run_main(argv: list[str]) -> int:
    """Run ``argv`` (the arguments after ``python``) the way the interpreter would; returns the exit code."""
    import runpy
    import traceback

    if argv[:1] == ["-u"]:  # unbuffered stdio, as torchrun starts its `-m MODULE` workers
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(write_through=True)
        argv = argv[1:]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


# ----------------------------------------------------------------------------- the test side

_zygote: dict[str, Any] = {}


def _socket_path() -> str:
    """This test worker's zygote, started on first use (one per xdist worker)."""
    if _zygote.get("pid") == os.getpid():
        return _zygote["path"]
    path = str(Path("/tmp") / f"ftsgd-zygote-{os.getpid()}-{time.monotonic_ns()}.sock")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([PYTHON, __file__, path], stdout=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", "the test zygote did not start"
    _zygote.update(pid=os.getpid(), path=path, proc=proc)
    atexit.register(_stop, path, proc)
    return path


def launcher() -> str:
    """An executable that stands in for ``python`` and runs its arguments in this worker's zygote.

    For command lines built by code under test (``ftsgd sweep``'s runs, ``torchrun --no-python`` workers).
    Beside it lies ``ftsgd``, the same for the console script. It also puts the zygote's socket into
    ``os.environ`` (``FTSGD_TEST_ZYGOTE``) for the processes they start.
    """
    folder = Path(_socket_path() + ".bin")
    if not folder.exists():
        client = (REPO / "tests" / "_zygote_client.py").read_text()
        folder.mkdir()
        for name, prefix in (("python", "[]"), ("ftsgd", '["-m", "ftsgd"]')):
            text = client.replace("ARGV_PREFIX: list[str] = []", f"ARGV_PREFIX: list[str] = {prefix}")
            (folder / name).write_text(f"#!{PYTHON} -SE\n{text}")
            (folder / name).chmod(0o755)
    os.environ["FTSGD_TEST_ZYGOTE"] = _socket_path()
    return str(folder / "python")


def _stop(path: str, proc: subprocess.Popen) -> None:
    shutil.rmtree(path + ".bin", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _ours(args: Sequence[str]) -> bool:
    return len(args) > 1 and os.path.realpath(args[0]) in {
        os.path.realpath(sys.executable),
        os.path.realpath(PYTHON),
    }


def _fd_for(spec: Any, default: int, mode: str) -> tuple[int, BinaryIO | None, bool]:
    """The descriptor the child gets for one stream, the parent's end of a pipe, and whether to close it."""
    if spec is None:
        return default, None, False
    if spec == PIPE:
        r, w = os.pipe()
        child, mine = (r, w) if mode == "w" else (w, r)
        return child, os.fdopen(mine, mode + "b"), True
    if spec == DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    if spec == subprocess.STDOUT:
        return -1, None, False
    return (spec if isinstance(spec, int) else spec.fileno()), None, False


def Popen(args: Sequence[str], **kwargs: Any) -> Any:
    """:class:`subprocess.Popen` through the zygote (or a normal subprocess for commands that are not ours)."""
    return ZygoteProcess(args, **kwargs) if _ours(args) else subprocess.Popen(args, **kwargs)


class ZygoteProcess:
    """A zygote-forked process with the parts of :class:`subprocess.Popen`'s interface the tests use."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        text: bool = False,
        start_new_session: bool = True,
    ) -> None:
        self.args, self.text, self.returncode = list(args), text, None
        in_fd, self.stdin, close_in = _fd_for(stdin, 0, "w")
        out_fd, self.stdout, close_out = _fd_for(stdout, 1, "r")
        err_fd, self.stderr, close_err = _fd_for(stderr, 2, "r")
        err_fd = out_fd if err_fd == -1 else err_fd
        if text:
            self.stdin, self.stdout, self.stderr = (
                None if f is None else io.TextIOWrapper(f, write_through=True)
                for f in (self.stdin, self.stdout, self.stderr)
            )
        request = {
            "argv": self.args[1:],
            "env": dict(os.environ if env is None else env),
            "cwd": str(cwd or os.getcwd()),
        }
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_socket_path())
        socket.send_fds(self._conn, [json.dumps(request).encode()], [in_fd, out_fd, err_fd])
        for fd, close in ((in_fd, close_in), (out_fd, close_out), (err_fd, close_err and err_fd != out_fd)):
            if close:
                os.close(fd)
        self.pid = struct.unpack("!i", self._recv(4))[0]

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._conn.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the test zygote went away")
            data += chunk
        return data

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self.returncode = struct.unpack("!i", self._recv(4))[0]
            except BlockingIOError:
                pass
            finally:
                self._conn.setblocking(True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self.returncode = struct.unpack("!i", self._recv(4))[0]
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            finally:
                self._conn.settimeout(None)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: bytes | str | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        results: dict[str, Any] = {}
        readers = [
            threading.Thread(target=lambda n=name, s=stream: results.__setitem__(n, s.read()), daemon=True)
            for name, stream in (("out", self.stdout), ("err", self.stderr))
            if stream is not None and not stream.closed  # a test may have closed its end (a gone reader)
        ]
        for reader in readers:
            reader.start()
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        return results.get("out"), results.get("err")


def run(
    args: Sequence[str],
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """:func:`subprocess.run` through the zygote (or a normal subprocess for commands that are not ours)."""
    if not _ours(args):
        return subprocess.run(
            args, input=input, capture_output=capture_output, timeout=timeout, check=check, **kwargs
        )
    if capture_output:
        kwargs.update(stdout=PIPE, stderr=PIPE)
    if input is not None:
        kwargs["stdin"] = PIPE
    proc = ZygoteProcess(args, **kwargs)
    try:
        out, err = proc.communicate(input, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


if __name__ == "__main__":
    _serve(sys.argv[1])
