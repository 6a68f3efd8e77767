"""The run-directory lock is not kept alive by forked children (DataLoader workers).

Workers are forked from the trainer and share its open file descriptions, flock's included; after a
``kill -9`` they live on for up to ~5 s until they notice, and an immediate ``--resume`` was refused as
"in use by PID <dead>" (tests/test_faults.py's kill -9 test failed that way in full-suite runs).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ftsgd.rundir import locked


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ready, started = os.pipe()
    with locked(out):
        pid = os.fork()
        if pid == 0:  # the child: a stand-in for a DataLoader worker that outlives its parent's lock
            os.write(started, b"1")  # the fork handlers have run by now
            time.sleep(30)
            os._exit(0)
        assert os.read(ready, 1) == b"1"
    try:
        with locked(out):  # the parent let go; the child is still alive
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(started)
