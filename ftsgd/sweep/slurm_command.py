"""``ftsgd sweep --slurm``: the same sweep, each grid point a task of one Slurm job array.

ftsgd hands the runs to Slurm and keeps no scheduler of its own: the sweep folder, the run directories
and ``squeue`` say where every point is, so the command can be rerun at any time (from cron too). Each
rerun shows every point's state, submits what is neither finished, queued, running nor failed (failed:
only with ``--retry-failed``), and once all points are finished prints the selection as a local sweep
does. ``--wait`` polls until nothing of the sweep is queued or running.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ftsgd.errors import Interrupted, RunError, UsageError
from ftsgd.run.rundir import RunDir, lock_holder, locked
from ftsgd.sweep.conclude import conclude
from ftsgd.sweep.jobs import Stop, catch_signals, failure_line
from ftsgd.sweep.output import failure_summary, say
from ftsgd.sweep.plan import Plan, PlannedRun, SweepOptions, plan_sweep
from ftsgd.sweep.record import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PENDING,
    QUEUED,
    RUNNING,
    RunRecord,
    Sweep,
    check_out_dir,
    log_path,
    now,
    open_sweep,
    read_previous,
    run_metrics,
    status_counts,
    sweep_document,
)
from ftsgd.sweep.slurm import (
    QUEUED_STATES,
    RUNNING_STATES,
    TaskState,
    find_command,
    parse_slurm_option,
    sweep_tasks,
)
from ftsgd.sweep.slurm import submit as sbatch_submit
from ftsgd.sweep.slurm_script import SlurmSettings, exit_path, job_name, job_script, script_path
from ftsgd.utils import console
from ftsgd.utils.fileio import atomic_write_text

POLL_ENV = "FTSGD_SLURM_POLL_S"
"""Seconds between two looks at squeue under ``--wait`` (default 30)."""


def slurm_settings(plan: Plan, opts: SweepOptions) -> SlurmSettings:
    """The recipes' ``[slurm]`` tables (they must agree: one array) with ``--slurm-opt`` on top.

    Raises:
        UsageError: the recipes of the sweep ask Slurm for different things, or a ``--slurm-opt`` is bad.
    """
    tables = {dataclasses.astuple(run.resolved.slurm): run.resolved.slurm for run in plan.runs}
    if len(tables) > 1:
        raise UsageError(
            "--slurm: the sweep's recipes have different [slurm] tables, and one job array takes one set of "
            "options; give them as --slurm-opt KEY=VALUE instead (or run one sweep per recipe)"
        )
    table = next(iter(tables.values()))
    options: dict[str, str] = {}
    for f in dataclasses.fields(table):
        value = getattr(table, f.name)
        if f.name != "signal_before_s" and value not in ("", 0):
            options[f.name.replace("_", "-")] = str(value)
    if opts.gpus_per_run > 1:
        options.setdefault("gres", f"gpu:{opts.gpus_per_run}")
    for text in opts.slurm_opts:
        key, value = parse_slurm_option(text)
        options[key] = value
    options = {k: v for k, v in options.items() if not (k == "gres" and v == "")}  # gres= drops it
    return SlurmSettings(options, opts.gpus_per_run, table.signal_before_s)


def check_slurm_usage(opts: SweepOptions) -> None:
    """Flags that only make sense with ``--slurm``, or not with it (before anything is planned)."""
    if not opts.slurm:
        given = [
            flag
            for flag, on in (
                ("--slurm-opt", bool(opts.slurm_opts)),
                ("--wait", opts.wait),
                ("--gpus-per-run", opts.gpus_per_run != 1),
            )
            if on
        ]
        if given:
            raise UsageError(f"{', '.join(given)} only work with --slurm")
        return
    if opts.jobs != 1 or opts.devices is not None:
        raise UsageError(
            "--slurm hands every run to Slurm, which decides where and how many run at once: drop --jobs "
            "and --devices (ask Slurm for GPUs with --slurm-opt gres=gpu:1 or --gpus-per-run N)"
        )
    if opts.gpus_per_run < 1:
        raise UsageError(f"--gpus-per-run must be >= 1, got {opts.gpus_per_run}")


def slurm_sweep_command(opts: SweepOptions) -> dict[str, Any]:
    """``ftsgd sweep --slurm``: plan, check, submit what needs it, show every point's state.

    Returns:
        ``sweep.json``'s content (with ``--print-commands``: the job script's path and text).

    Raises:
        UsageError: as a local sweep, plus a missing ``sbatch`` and options sbatch refused; nothing was
            submitted then.
        RunError: some points failed, or (``--wait``) some ended without finishing.
        Interrupted: Ctrl-C under ``--wait``: the tasks keep running, the message says how to cancel them.
    """
    check_slurm_usage(opts)
    plan = plan_sweep(opts)
    settings = slurm_settings(plan, opts)
    if opts.print_commands:
        check_out_dir(plan, read_previous(plan.out), opts.allow_changed_grid)
        return print_script(plan, settings, opts.as_json)
    find_command("sbatch")
    with locked(plan.out, "sweep directory"):
        sweep = open_sweep(plan, opts)
        refresh(sweep, announce=True, retry_failed=opts.retry_failed)
        submit_missing(sweep, settings)
    if opts.wait:
        wait_for(sweep)
    return conclude_slurm(sweep)


def print_script(plan: Plan, settings: SlurmSettings, as_json: bool) -> dict[str, Any]:
    """``--print-commands --slurm``: the job script on stdout; nothing is written or submitted."""
    text = job_script(plan, settings)
    document = {"script": text, "path": str(script_path(plan.out.resolve()))}
    if as_json:
        console.print_json(document)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return document


def point_state(
    out: Path, run: PlannedRun, task: TaskState | None, before: RunRecord, *, retry_failed: bool = False
) -> RunRecord:
    """A point's record from its run directory, squeue and the exit status its last task left
    (``retry_failed``: a failed exit status makes the point pending again, to be resubmitted)."""
    if RunDir(run.path).status() == FINISHED:
        return RunRecord(FINISHED, exit_code=0, metrics=run_metrics(run.path))
    if task is not None and task.state in QUEUED_STATES:
        return RunRecord(QUEUED, slurm_task=task.job)
    if task is not None and task.state in RUNNING_STATES:
        return RunRecord(RUNNING, started=before.started or now(), slurm_task=task.job)
    if before.status == FAILED:
        return before
    ended = read_exit(out, run)
    if ended is None:
        return RunRecord(INTERRUPTED if RunDir(run.path).status() != "new" else PENDING)
    code, job = ended
    if code >= 128:  # 128 + N: stopped by signal N (after saving), or killed by it
        why = f"Slurm task {job} stopped ({code}); the same sweep command resubmits it"
        return RunRecord(INTERRUPTED, exit_code=code, error=why, slurm_task=job)
    if retry_failed:
        return RunRecord(INTERRUPTED if RunDir(run.path).status() != "new" else PENDING)
    log = log_path(out, run)
    error = failure_line(log, last_attempt(log), code)
    return RunRecord(FAILED, exit_code=code, error=error, ended=now(), slurm_task=job)


def read_exit(out: Path, run: PlannedRun) -> tuple[int, str] | None:
    """``(exit status, task)`` its job script left in ``OUT/slurm/exit/N``, or None (no ended attempt, or
    one killed before it could write: scancel's SIGKILL, a node failure)."""
    try:
        code, job = exit_path(out, run.index).read_text().split()
        return int(code), job
    except (OSError, ValueError):
        return None


def last_attempt(log: Path) -> int:
    """Where the log's last attempt starts (its last ``=== `` line), so an error is this attempt's."""
    try:
        data = log.read_bytes()
    except OSError:
        return 0
    at = data.rfind(b"\n=== ")
    return at + 1 if at >= 0 else 0


def refresh(sweep: Sweep, *, announce: bool = False, retry_failed: bool = False) -> None:
    """Every point's state from disk and squeue; a line per point whose state changed (all when
    ``announce``), and ``sweep.json`` rewritten. ``retry_failed``: failed points become pending."""
    tasks = sweep_tasks(job_name(sweep.plan.out))
    total = len(sweep.plan.runs)
    for run in sweep.plan.runs:
        before = sweep.records[run.path]
        task = tasks.get(run.index)
        record = point_state(sweep.plan.out, run, task, before, retry_failed=retry_failed)
        if announce or record.status != before.status:
            say(
                f"[{run.index}/{total}] {record.status} {run.label}{state_detail(record, task)}",
                sweep.opts.as_json,
            )
        sweep.records[run.path] = record
    sweep.state = RUNNING if any(r.status in (QUEUED, RUNNING) for r in sweep.records.values()) else PENDING
    sweep.write()


def state_detail(record: RunRecord, task: TaskState | None) -> str:
    """``: Slurm task 12_3, Priority`` (queued, with squeue's reason), the error of a failed or interrupted
    point, or nothing."""
    if record.status in (QUEUED, RUNNING) and record.slurm_task:
        reason = (
            f", {task.reason}" if record.status == QUEUED and task and task.reason not in ("", "None") else ""
        )
        return f": Slurm task {record.slurm_task}{reason}"
    return f": {record.error}" if record.error and record.status != FINISHED else ""


def submit_missing(sweep: Sweep, settings: SlurmSettings) -> None:
    """Write the job script and submit, as one array, every point that is pending or was interrupted."""
    todo = [run for run in sweep.plan.runs if sweep.records[run.path].status in (PENDING, INTERRUPTED)]
    as_json = sweep.opts.as_json
    if not todo:
        say("nothing to submit: every point is finished, queued, running or failed", as_json)
        return
    script = script_path(sweep.plan.out.resolve())
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, job_script(sweep.plan, settings))
    os.chmod(script, 0o755)
    for run in todo:
        exit_path(sweep.plan.out, run.index).unlink(missing_ok=True)
    job = sbatch_submit(script, [run.index for run in todo])
    for run in todo:
        sweep.records[run.path] = RunRecord(QUEUED, slurm_task=f"{job}_{run.index}")
    sweep.state = RUNNING
    sweep.write()
    say(f"submitted {len(todo)} point(s) as Slurm job array {job} (job script: {script})", as_json)


def wait_for(sweep: Sweep) -> None:
    """Poll until none of the sweep's points is queued or running; Ctrl-C leaves the tasks running."""
    poll = float(os.environ.get(POLL_ENV, "") or 30)
    stop = Stop()  # SIGINT/SIGTERM end the wait, not the tasks
    with catch_signals(stop):
        while any(r.status in (QUEUED, RUNNING) for r in sweep.records.values()):
            deadline = time.monotonic() + poll
            while time.monotonic() < deadline and not stop.count:
                time.sleep(min(0.2, poll))
            if stop.count:
                name = signal.Signals(stop.signum).name
                raise Interrupted(
                    f"{name}: stopped waiting; the sweep's Slurm tasks keep running. See them with "
                    f"`squeue --name={job_name(sweep.plan.out)}`, cancel them with "
                    f"`scancel --name={job_name(sweep.plan.out)}`, or rerun this command to see their states",
                    stop.signum,
                )
            if lock_holder(sweep.plan.out):  # a rerun (cron) is updating the folder now: look next time
                continue
            with locked(sweep.plan.out, "sweep directory"):
                refresh(sweep)


def conclude_slurm(sweep: Sweep) -> dict[str, Any]:
    """Once nothing is queued or running: the local sweep's end (report, exit 1 for failed or unfinished
    points). Before: every point's counts, exit 0, or 1 when points failed."""
    counts = status_counts(sweep)
    if not counts[QUEUED] + counts[RUNNING]:
        return conclude(sweep, Stop())
    sweep.state = RUNNING
    sweep.write()
    document = sweep_document(sweep)
    if sweep.opts.as_json:
        console.print_json(document)
    say(
        f"{counts[FINISHED]} of {len(sweep.plan.runs)} points finished, {counts[QUEUED]} queued, "
        f"{counts[RUNNING]} running, {counts[FAILED]} failed; rerun this command to see their progress "
        "(or add --wait)",
        sweep.opts.as_json,
    )
    if counts[FAILED]:
        raise RunError(failure_summary(sweep))
    return document
