"""Training a sweep's runs in this process, one after another, instead of one subprocess per run.

``ftsgd sweep`` trains every run in its own process (:mod:`ftsgd.sweep.jobs`): a crash, a leak or a
``kill -9`` of one run cannot touch the others, and ``--jobs`` spreads them over GPUs and CPUs. Each child
pays for starting Python and importing torch and timm: 5.5-6.5 s of CPU time each on the 2-core machine
the project is tested on. That is nothing beside a real fine-tuning run, but more than the whole training
of a run of ``ftsgd demo --compare`` (about 4 s on one thread; well under a second with ``--quick``):
27 subprocesses would add about 3 minutes of CPU time to a comparison that trains for 3.5, and its test
would take three times as long. So the comparison trains its runs here, through the same machinery: the
same :class:`~ftsgd.sweep.plan.Plan`, the same records and ``sweep.json``
(:class:`~ftsgd.sweep.record.Sweep`), the same selection, and each run trained by the code
``ftsgd train --resume --quiet`` runs (the run directory's lock and resume policy,
:func:`ftsgd.run.resume.locked_plan`, then :class:`~ftsgd.train.trainer.Trainer`), with the recipe the
plan resolved exactly as ``ftsgd train`` resolves it. The run directories are therefore the ones the
subprocesses would write, and ``ftsgd sweep`` or ``ftsgd train --resume`` can continue them.

What it gives up: one run at a time, in the caller's torch thread setting; a failure that is not an
:class:`~ftsgd.errors.FtsgdError` (a bug) stops the sweep with its traceback instead of being recorded.
A run's log holds the command and, when it failed, its error (the output itself goes to the terminal).
SIGINT/SIGTERM: the Trainer catches them while it trains, saves its checkpoint and raises
:class:`~ftsgd.errors.Interrupted`; between runs the sweep catches them. Either way no further run starts
and the run is recorded as interrupted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ftsgd.errors import FtsgdError, Interrupted
from ftsgd.run.resume import locked_plan
from ftsgd.run.rundir import RunDir
from ftsgd.sweep.jobs import Stop, catch_signals, failure_line, held_elsewhere
from ftsgd.sweep.output import progress_line, say
from ftsgd.sweep.plan import PlannedRun
from ftsgd.sweep.record import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    RunRecord,
    Sweep,
    log_path,
    now,
    run_metrics,
)
from ftsgd.train.trainer import Trainer


def execute_in_process(sweep: Sweep) -> Stop:
    """Train every pending run of ``sweep`` in this process, in plan order, until done or stopped.

    Runs finished before are listed (``[2/9] finished before ...``), so the output shows every grid point.
    """
    total, stop = len(sweep.plan.runs), Stop()
    with catch_signals(stop):
        for run in sweep.plan.runs:
            record = sweep.records[run.path]
            log = log_path(sweep.plan.out, run)
            if record.status == FINISHED:
                say(progress_line(run, record, total, log, before=True), sweep.opts.as_json)
                continue
            if stop.count or record.status not in (PENDING, INTERRUPTED) or not available(sweep, run):
                continue
            sweep.records[run.path] = RunRecord(RUNNING, started=now(), pid=os.getpid())
            sweep.write()
            record, signum = train_run(run, sweep.plan.data, log, sweep.records[run.path])
            sweep.finish_run(run, record)
            say(progress_line(run, record, total, log), sweep.opts.as_json)
            if signum:
                stop(signum, None)
    return stop


def available(sweep: Sweep, run: PlannedRun) -> bool:
    """Whether ``run`` is still to be trained here: not finished meanwhile (then recorded so), not held by
    another process (then left to it, as :func:`ftsgd.sweep.jobs.start_run` does)."""
    if RunDir(run.path).status() == FINISHED:
        sweep.finish_run(run, RunRecord(FINISHED, exit_code=0, metrics=run_metrics(run.path)))
        return False
    holder = held_elsewhere(run.path)
    if holder:
        say(
            f"[{run.index}/{len(sweep.plan.runs)}] skipped {run.label}: in use by {holder}",
            sweep.opts.as_json,
        )
        return False
    return True


def train_run(run: PlannedRun, data: Path, log: Path, before: RunRecord) -> tuple[RunRecord, int]:
    """Train ``run`` as ``ftsgd train ... --resume --quiet`` would; its record and the signal that stopped it.

    Returns:
        ``(record, signum)``: ``signum`` is 0 unless SIGINT/SIGTERM interrupted the run (checkpoint saved).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"=== {now()} {run.command} (in the sweep's process)\n")
        offset = fh.tell()
    record = RunRecord(started=before.started)
    try:
        train_resumable(run, data)
    except Interrupted as exc:
        record.status, record.exit_code, record.ended = INTERRUPTED, exc.exit_code, now()
        return record, exc.signum
    except FtsgdError as exc:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"error: {exc}\n")
        record.status, record.exit_code = FAILED, exc.exit_code
        record.error, record.ended = failure_line(log, offset, exc.exit_code), now()
        return record, 0
    record.status, record.exit_code, record.ended = FINISHED, 0, now()
    record.metrics = run_metrics(run.path)
    return record, 0


def train_resumable(run: PlannedRun, data: Path) -> None:
    """``ftsgd train --resume --quiet`` with ``run``'s arguments: lock the run directory, then start, continue
    or (when it is finished) leave the run, refusing one that holds another recipe (exit 2)."""
    with contextlib.ExitStack() as held:
        resolved, resume = locked_plan(held, RunDir(run.path), run.resolved, data, True)
        if resolved is not None:
            Trainer(resolved, run.path, resume=resume, quiet=True, argv=["ftsgd", *run.args]).fit()
