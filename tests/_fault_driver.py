"""Run the real ``ftsgd`` CLI in a subprocess with faults injected from the outside.

Usage: ``python tests/_fault_driver.py <ftsgd arguments...>`` with ``FTSGD_FAULT`` holding
comma-separated directives:

``log=PATH``
    append one line to PATH after every optimizer step (so a test can tell how far a run got).
``delay=SECONDS``
    sleep after every optimizer step (so a signal sent by the test lands mid-epoch).
``kill_in_write=NAME:N:partial`` / ``kill_in_write=NAME:N:before_rename``
    during this process's N-th atomic write of the file NAME (``checkpoint.pt``,
    ``model.safetensors``, ``metrics.jsonl``, ...), SIGKILL the process: ``partial`` after the
    temporary file holds half of the new bytes, ``before_rename`` once it holds all of them but
    before it replaces the target. The write itself is ftsgd's own (``fileio._atomic_write``).
``kill_in_eval=N``
    SIGKILL the process after the first batch of its N-th evaluation pass.

Nothing in ftsgd is changed: the process really dies of SIGKILL at the named moment, and its
files are whatever the real code had written by then. This module is not a test file (its name
does not start with ``test_``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


def _install(spec: str) -> None:
    import ftsgd.fileio as fileio
    import ftsgd.train as train

    directives = dict(item.split("=", 1) for item in spec.split(",") if item)

    log = directives.get("log")
    delay = float(directives.get("delay", "0"))
    if log or delay:
        real_step = train._train_step

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            if log:
                with open(log, "a") as fh:
                    fh.write("step\n")
            if delay:
                time.sleep(delay)
            return result

        train._train_step = step

    if "kill_in_write" in directives:
        name, nth, mode = directives["kill_in_write"].split(":")
        real_write = fileio._atomic_write
        seen = [0]

        def atomic_write(path, write):
            if Path(path).name != name:
                return real_write(path, write)
            seen[0] += 1
            if seen[0] != int(nth):
                return real_write(path, write)

            def dying_write(fh, tmp):
                write(fh, tmp)
                fh.flush()
                if mode == "partial":
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                _die()

            return real_write(path, dying_write)

        fileio._atomic_write = atomic_write

    if "kill_in_eval" in directives:
        real_evaluate = train.evaluate
        calls = [0]

        def evaluate(model, loader, **kwargs):
            calls[0] += 1
            if calls[0] == int(directives["kill_in_eval"]):
                batches = iter(loader)
                next(batches)  # workers (if any) are running now
                _die()
            return real_evaluate(model, loader, **kwargs)

        train.evaluate = evaluate


def main() -> None:
    _install(os.environ.get("FTSGD_FAULT", ""))
    from ftsgd.cli import main as cli_main

    sys.argv = ["ftsgd", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
