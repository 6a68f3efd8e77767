"""Stand-in for ``python`` that runs its arguments in the test zygote (:mod:`_zygote`) as a real process.

Used where a command line is built by someone else: ``ftsgd sweep`` starting ``sys.executable -m ftsgd
train ...`` per run, ``torchrun --no-python`` starting a worker per rank. It imports only the standard
library (it runs under ``python -S -E``), passes its stdin/stdout/stderr, environment and working directory
to the zygote, forwards the signals a launcher sends (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2) to the
forked process, and ends the way that process ended: its exit code, or killed by the same signal. If this
stand-in is killed with SIGKILL, the zygote sees its connection close and kills the process group it forked.
"""

import json
import os
import signal
import socket
import struct
import sys

ARGV_PREFIX: list[str] = []  # ["-m", "ftsgd"] in the stand-in for the console script


def _recv_int(conn: socket.socket) -> int:
    data = b""
    while len(data) < 4:
        chunk = conn.recv(4 - len(data))
        if not chunk:
            sys.exit("the test zygote went away")
        data += chunk
    return struct.unpack("!i", data)[0]


def main() -> None:
    target: list[int] = []  # the forked process, once known; signals before that wait in `pending`
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if target:
            os.kill(target[0], signum)
        else:
            pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(os.environ["FTSGD_TEST_ZYGOTE"])
    request = {
        "argv": [*ARGV_PREFIX, *sys.argv[1:]],
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "watch": True,
    }
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    target.append(_recv_int(conn))
    for signum in pending:
        os.kill(target[0], signum)
    code = _recv_int(conn)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
