"""Run the real ``ftsgd`` CLI in a subprocess with faults injected from the outside.

Usage: ``python tests/_fault_driver.py <ftsgd arguments...>`` with ``FTSGD_FAULT`` holding
comma-separated directives:

``log=PATH``
    append one line to PATH after every optimizer step (so a test can tell how far a run got); under
    ``torchrun`` the line names the process: ``step RANK PID``.
``delay=SECONDS``
    sleep after every optimizer step (so a signal sent by the test lands mid-epoch).
``kill_in_write=NAME:N:partial`` / ``kill_in_write=NAME:N:before_rename``
    during this process's N-th atomic write of the file NAME (``checkpoint.pt``,
    ``model.safetensors``, ``metrics.jsonl``, ...), SIGKILL the process: ``partial`` after the
    temporary file holds half of the new bytes, ``before_rename`` once it holds all of them but
    before it replaces the target. The write itself is ftsgd's own (``fileio._atomic_write``).
``kill_in_eval=N``
    SIGKILL the process after the first batch of its N-th evaluation pass.
``log_writes=PATH``
    append ``RANK NAME`` to PATH for every atomic file write (checkpoint, export, metrics, summary, ...),
    so a test can tell which process of a ``torchrun`` job wrote what.
``fail_on_rank=R:N``
    under ``torchrun``, the process of rank R fails (a ``RunError``) in its N-th optimizer step, the
    way a process whose disk filled up or whose GPU failed would.

Under ``torchrun`` every process runs this driver (``python -m torch.distributed.run ... tests/_fault_driver.py
train ...``).

Nothing in ftsgd's code is changed: the driver wraps the Trainer's own steps (``Trainer.step``,
``Trainer.evaluate_split``) and the atomic writer, the process really dies of SIGKILL at the named
moment, and its files are whatever the real code had written by then. This module is not a test file (its name
does not start with ``test_``).
"""

from __future__ import annotations

import itertools
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
    import ftsgd.utils.fileio as fileio
    from ftsgd.train.trainer import Trainer

    directives = dict(item.split("=", 1) for item in spec.split(",") if item)

    log = directives.get("log")
    delay = float(directives.get("delay", "0"))
    rank = int(os.environ.get("RANK", "0"))
    fail_rank, fail_step = (int(v) for v in directives.get("fail_on_rank", "-1:0").split(":"))
    if log or delay or fail_rank >= 0:
        real_step = Trainer.step
        steps = itertools.count(1)

        def step(self, *args, **kwargs):
            if rank == fail_rank and next(steps) == fail_step:
                from ftsgd.errors import RunError

                raise RunError(f"injected failure in step {fail_step}")
            result = real_step(self, *args, **kwargs)
            if log:
                with open(log, "a") as fh:
                    fh.write(f"step {rank} {os.getpid()}\n")
            if delay:
                time.sleep(delay)
            return result

        Trainer.step = step

    if "log_writes" in directives:
        logged_write = fileio._atomic_write

        def atomic_write_logged(path, write):
            with open(directives["log_writes"], "a") as fh:
                fh.write(f"{rank} {Path(path).name}\n")
            return logged_write(path, write)

        fileio._atomic_write = atomic_write_logged

    if "kill_in_write" in directives:
        name, nth, mode = directives["kill_in_write"].split(":")
        real_write = fileio._atomic_write
        writes = itertools.count(1)

        def atomic_write(path, write):
            if Path(path).name != name:
                return real_write(path, write)
            if next(writes) != int(nth):
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
        real_evaluate = Trainer.evaluate_split
        passes = itertools.count(1)

        def evaluate_split(self, split):
            if next(passes) == int(directives["kill_in_eval"]):
                batches = iter(self.eval_loader(split))
                next(batches)  # workers (if any) are running now
                _die()
            return real_evaluate(self, split)

        Trainer.evaluate_split = evaluate_split


def main() -> None:
    _install(os.environ.get("FTSGD_FAULT", ""))
    from ftsgd.cli.main import main as cli_main

    sys.argv = ["ftsgd", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
