"""What a sweep prints while it runs and when it ends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ftsgd.report.tables import human_seconds, print_terminal
from ftsgd.run.rundir import RunDir
from ftsgd.sweep.plan import Plan, PlannedRun
from ftsgd.sweep.record import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PENDING,
    SWEEP_FILE,
    RunRecord,
    Sweep,
    log_path,
    status_counts,
)
from ftsgd.utils import console


def say(text: str, as_json: bool) -> None:
    """A progress line: on stdout, or on stderr when stdout carries the one JSON object."""
    if as_json:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    else:
        console.info(text)


def progress_line(run: PlannedRun, record: RunRecord, total: int, log: Path, *, before: bool = False) -> str:
    """``[3/12] finished sgd optim.lr=0.001,train.seed=0: val 81.25%, ood 60.00% (best epoch 4/5, 2.1 min)``.

    ``before``: the run was finished when the sweep started (``[3/12] finished before sgd ...``).
    """
    head = f"[{run.index}/{total}] {record.status}{' before' if before else ''} {run.label}"
    if record.status == FINISHED and record.metrics:
        m = record.metrics
        accuracy = ", ".join(f"{k} {100 * v:.2f}%" for k, v in m["accuracy"].items())
        seconds = f", {human_seconds(m['train_time_s'])}" if m["train_time_s"] is not None else ""
        return f"{head}: {accuracy} (best epoch {m['best_epoch']}/{m['epochs']}{seconds})"
    if record.status == FAILED:
        return f"{head}: exit {record.exit_code}: {record.error} (log: {log})"
    if record.error:  # stopped from outside, or left to the process that holds its lock
        return f"{head}: {record.error}"
    return f"{head}: stopped; the same command continues it"


def announce(sweep: Sweep) -> None:
    """What the sweep is about to do, and runs under ``--out`` that are not in its grid."""
    counts = status_counts(sweep)
    plan, opts = sweep.plan, sweep.opts
    todo = counts[PENDING] + counts[INTERRUPTED]
    text = (
        f"sweep {plan.out}: {len(plan.runs)} runs of {len(plan.recipes)} recipe(s), {counts[FINISHED]} finished, "
        f"{todo} to train, {opts.jobs} at a time"
    )
    if counts[FAILED]:
        text += f"; {counts[FAILED]} failed before, not retried (--retry-failed retries them)"
    say(text, opts.as_json)
    if sweep.outside:
        shown = ", ".join(str(p.relative_to(plan.out)) for p in sweep.outside[:5])
        more = f" and {len(sweep.outside) - 5} more" if len(sweep.outside) > 5 else ""
        say(
            f"{len(sweep.outside)} run(s) under {plan.out} are not in this grid (kept, not in its selection): "
            f"{shown}{more}",
            opts.as_json,
        )


def print_sweep_report(sweep: Sweep) -> None:
    """The report's grid-point and selection tables (``ftsgd report``'s printing), then a summary line."""
    report = sweep.report
    if report is not None:
        for problem in report.problems:
            console.warn(problem)
        print_terminal(report, ["points", "selection"], sweep.plots)
    counts = status_counts(sweep)
    console.info(
        f"{len(sweep.plan.runs)} runs: "
        + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        + f"; record: {sweep.plan.out / SWEEP_FILE}"
    )


def incomplete_summary(sweep: Sweep) -> str:
    """The exit-1 message of a sweep that ended with runs neither finished nor failed, and why each is left."""
    left = [run for run in sweep.plan.runs if sweep.records[run.path].status in (PENDING, INTERRUPTED)]
    lines = [f"  - {run.label}: {sweep.records[run.path].error or 'not started'}" for run in left]
    return (
        f"sweep incomplete: {len(left)} of {len(sweep.plan.runs)} runs are not finished (none failed):\n"
        + "\n".join(lines)
        + "\nRun the same command again to continue them (once another process holding one has ended)."
    )


def failure_summary(sweep: Sweep) -> str:
    """The exit-1 message: each failed run with its exit code, first error line and log."""
    failed = [run for run in sweep.plan.runs if sweep.records[run.path].status == FAILED]
    lines = []
    for run in failed:
        record = sweep.records[run.path]
        lines.append(
            f"  - {run.label}: exit {record.exit_code}: {record.error} (log: {log_path(sweep.plan.out, run)})"
        )
    return (
        f"{len(failed)} of {len(sweep.plan.runs)} runs failed (the others were trained):\n"
        + "\n".join(lines)
        + (
            "\nRerunning the same command trains them again."
            if sweep.opts.retry_failed
            else "\nRerunning the same command skips them; add --retry-failed to train them again."
        )
    )


def print_pending_commands(plan: Plan, as_json: bool) -> dict[str, Any]:
    """One ``ftsgd train ... --resume`` line per run not finished yet (for GNU parallel, a Slurm array)."""
    pending = [run for run in plan.runs if RunDir(run.path).status() != FINISHED]
    document = {
        "commands": [run.runnable_command for run in pending],
        "runs": [str(run.path) for run in pending],
    }
    if as_json:
        console.print_json(document)
    else:
        sys.stdout.write("".join(f"{command}\n" for command in document["commands"]))
        sys.stdout.flush()
    if not pending:
        console.warn(f"nothing to run: every run of the sweep in {plan.out} is finished")
    return document
