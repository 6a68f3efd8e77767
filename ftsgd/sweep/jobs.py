"""Running the planned runs as subprocesses, one per slot (a GPU, a share of the CPUs)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ftsgd.run.rundir import RunDir, lock_holder
from ftsgd.sweep.output import progress_line, say
from ftsgd.sweep.plan import PlannedRun, SweepOptions, parse_devices
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
from ftsgd.train.tracking import GROUP_ENV, TAGS_ENV

POLL_S = 0.2


@dataclass(frozen=True)
class Slot:
    """Where one of ``--jobs`` concurrent runs executes: its GPU, CPUs and thread count."""

    index: int
    device: str | None
    cpus: tuple[int, ...]
    """CPU affinity (empty: inherit the sweep's)."""
    threads: int


@dataclass
class Active:
    """A run being trained by a child process."""

    run: PlannedRun
    slot: Slot
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]
    offset: int
    """Where this attempt's output starts in the log."""


@dataclass
class Stop:
    """SIGINT/SIGTERM received by the sweep: the last signal, how many came and how many were passed on."""

    signum: int = 0
    count: int = 0
    forwarded: int = 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.signum = signum
        self.count += 1


def make_slots(opts: SweepOptions) -> list[Slot]:
    """One slot per job: a GPU (round-robin over ``--devices``, or every visible GPU when there are several
    jobs) and a disjoint share of the CPUs, with ``OMP_NUM_THREADS`` threads (the user's value if set)."""
    devices = parse_devices(opts.devices) if opts.devices else (visible_gpus() if opts.jobs > 1 else [])
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = list(range(os.cpu_count() or 1))
    share = max(1, len(cpus) // opts.jobs)
    user_threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(user_threads) if user_threads.isdigit() and int(user_threads) > 0 else share
    slots = []
    for k in range(opts.jobs):
        if opts.jobs == 1:
            mine: tuple[int, ...] = ()
        elif len(cpus) >= opts.jobs:
            mine = tuple(cpus[k * share : (k + 1) * share])
        else:
            mine = (cpus[k % len(cpus)],)
        slots.append(Slot(k, devices[k % len(devices)] if devices else None, mine, threads))
    return slots


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES values for a child (none without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def execute(sweep: Sweep, slots: list[Slot]) -> Stop:
    """Train every pending run, ``len(slots)`` at a time, until done or stopped by SIGINT/SIGTERM."""
    queue = [run for run in sweep.plan.runs if sweep.records[run.path].status in (PENDING, INTERRUPTED)]
    active: list[Active] = []
    stop = Stop()
    with catch_signals(stop):
        try:
            while queue or active:
                forward_signals(stop, active, sweep.opts.as_json)
                while queue and not stop.count and len(active) < len(slots):
                    used = {a.slot.index for a in active}
                    slot = next(s for s in slots if s.index not in used)
                    started = start_run(sweep, queue.pop(0), slot)
                    if started is not None:
                        active.append(started)
                for done in [a for a in active if a.process.poll() is not None]:
                    active.remove(done)
                    record = run_result(done, sweep.records[done.run.path], bool(stop.count))
                    sweep.finish_run(done.run, record)
                    say(progress_line(done.run, record, len(sweep.plan.runs), done.log), sweep.opts.as_json)
                if stop.count and not active:
                    break
                time.sleep(POLL_S)
        except BaseException:  # the sweep itself failed (e.g. its disk is full): stop its runs cleanly
            for a in active:
                with contextlib.suppress(ProcessLookupError):
                    a.process.send_signal(signal.SIGTERM)
            for a in active:
                a.process.wait()
            raise
    return stop


def start_run(sweep: Sweep, run: PlannedRun, slot: Slot) -> Active | None:
    """Launch ``run`` in ``slot`` (None when it was finished meanwhile, e.g. by a scheduler)."""
    if RunDir(run.path).status() == FINISHED:
        sweep.finish_run(run, RunRecord(FINISHED, exit_code=0, metrics=run_metrics(run.path)))
        return None
    holder = held_elsewhere(run.path)
    if holder:
        say(
            f"[{run.index}/{len(sweep.plan.runs)}] skipped {run.label}: in use by {holder}",
            sweep.opts.as_json,
        )
        return None
    active = launch(run, slot, sweep.plan.out)
    sweep.records[run.path] = RunRecord(RUNNING, started=now(), pid=active.process.pid)
    sweep.write()
    where = f" on GPU {slot.device}" if slot.device is not None else ""
    if slot.cpus:
        where += f" (CPUs {','.join(map(str, slot.cpus))}, {slot.threads} thread(s))"
    say(f"[{run.index}/{len(sweep.plan.runs)}] start {run.label}{where}", sweep.opts.as_json)
    return active


def held_elsewhere(path: Path) -> str | None:
    """Who holds the run directory's lock (``PID 12 on host``) when another process trains it, else None.

    A run an external scheduler or an orphan of a killed sweep is training is left to it, not started twice.
    """
    return lock_holder(path)


def launch(run: PlannedRun, slot: Slot, out: Path) -> Active:
    """Start ``python -m ftsgd train ... --resume --quiet`` in its own session, pinned to ``slot``.

    Its own session: a Ctrl-C at the terminal reaches the sweep only, which passes it on once, so each run
    gets exactly one signal and saves its checkpoint. On Linux the child is also told to get SIGTERM when
    the sweep dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the sweep still stops its runs cleanly.
    """
    log = log_path(out, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "ab")  # noqa: SIM115 - closed by run_result when the child exits
    handle.write(f"=== {now()} {run.command}\n".encode())
    handle.flush()
    env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads), **tracking_env(run, out))
    if slot.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.device
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "ftsgd", *run.args],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=functools.partial(child_setup, slot.cpus, parent_death_signal()),
        )
    except BaseException:
        handle.close()
        raise
    return Active(run, slot, process, log, handle, handle.tell())


def tracking_env(run: PlannedRun, out: Path) -> dict[str, str]:
    """What the run's experiment trackers group it by (the sweep's folder name: a W&B group, an MLflow tag)
    and tag it with (its recipe and grid point), as environment variables for its process."""
    point = {"recipe": run.recipe, **run.values}
    return {GROUP_ENV: out.name, TAGS_ENV: json.dumps(point, default=str)}


def parent_death_signal() -> Any:
    """libc's ``prctl`` on Linux (looked up here, before the fork), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None


def child_setup(cpus: tuple[int, ...], prctl: Any) -> None:
    """In the child, between fork and exec: its CPUs, and SIGTERM when the sweep dies."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    if prctl is not None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


STOPPED_FROM_OUTSIDE = {
    128 + signal.SIGUSR1,
    128 + signal.SIGINT,
    128 + signal.SIGTERM,
    -signal.SIGKILL,
    -signal.SIGTERM,
    -signal.SIGINT,
}
"""Exit codes of a run that was stopped, not one that failed: SIGINT/SIGTERM after saving its checkpoint
(130, 143), or killed outright (the OOM killer's SIGKILL, a scheduler's SIGTERM before the handlers ran)."""


def run_result(active: Active, before: RunRecord, stopping: bool) -> RunRecord:
    """The record of a run whose process ended.

    ``finished``; ``interrupted`` when the sweep stopped it or something else did (a signal: resumable, the
    same sweep command continues it); ``pending`` when another process took the run directory's lock first
    (an external ``ftsgd train --resume``: the run is left to it, not failed); else ``failed`` (the run
    itself failed: divergence, bad data, an error exit), which a rerun skips without ``--retry-failed``.
    """
    active.handle.close()
    code = active.process.returncode
    record = RunRecord(started=before.started, ended=now(), exit_code=code if code >= 0 else 128 - code)
    line = failure_line(active.log, active.offset, code) if code else ""
    if RunDir(active.run.path).status() == FINISHED:  # by this child, or by a process that took it over
        record.status, record.metrics = FINISHED, run_metrics(active.run.path)
    elif stopping or code in STOPPED_FROM_OUTSIDE:
        record.status = INTERRUPTED
        if not stopping:
            record.error = f"stopped from outside ({stop_reason(code)}); the same sweep command continues it"
    elif code == 2 and (held_elsewhere(active.run.path) or " in use by " in f" {line}"):
        record.status, record.error = PENDING, f"left to another process: {line}"
    else:
        record.status, record.error = FAILED, line
    return record


def stop_reason(code: int) -> str:
    """``killed by SIGKILL`` / ``SIGTERM, checkpoint saved`` for an exit code in :data:`STOPPED_FROM_OUTSIDE`."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"{signal.Signals(code - 128).name}, checkpoint saved"


def failure_line(log: Path, offset: int, code: int) -> str:
    """The first line of the run's error message (``error: ...``), else the last line it printed."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            text = line[len("error: ") :]
            return f"{text} {lines[i + 1]}" if text.endswith(":") and i + 1 < len(lines) else text
    if lines:
        return lines[-1]
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


@contextlib.contextmanager
def catch_signals(stop: Stop) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` instead of killing the sweep (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forward_signals(stop: Stop, active: list[Active], as_json: bool) -> None:
    """Pass each signal the sweep got to its running runs: the first makes them save and exit, a second
    stops them at once."""
    if stop.count <= stop.forwarded:
        return
    for a in active:
        with contextlib.suppress(ProcessLookupError):
            a.process.send_signal(stop.signum)
    name = signal.Signals(stop.signum).name
    if stop.forwarded == 0:
        say(
            f"{name}: stopping {len(active)} running run(s) (each saves a checkpoint); no new run starts",
            as_json,
        )
    stop.forwarded = stop.count
