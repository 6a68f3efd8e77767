"""Talking to Slurm with its own commands: ``sbatch`` to submit, ``squeue`` to see a sweep's tasks.

Slurm's commands, not a Python client: they are on every login node, speak for the cluster's own
configuration and version, and print messages users already know (an unknown partition is sbatch's own
sentence). ``sacct`` is not needed: what a task that Slurm has forgotten did is in its run directory and
the exit status its job script left (:func:`~ftsgd.sweep.slurm_script.exit_path`).
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ftsgd.errors import RunError, UsageError, first_line

QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
"""squeue states of a task that has not started (or waits to start again)."""
RUNNING_STATES = {
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
    "STOPPED",
}
"""squeue states of a task whose job script runs (or is just ending)."""

OWN_OPTIONS = {
    "array": "ftsgd submits the points that need it (resubmit some by hand with sbatch --array=...)",
    "job-name": "ftsgd names the array after the sweep folder, to find its tasks again",
    "output": "each point's output goes to OUT/logs/, Slurm's own to OUT/slurm/",
    "error": "each point's output goes to OUT/logs/, Slurm's own to OUT/slurm/",
    "open-mode": "a requeued task appends to its log",
    "requeue": "tasks are always requeueable (preemption, the early-warning signal)",
    "no-requeue": "tasks are always requeueable (preemption, the early-warning signal)",
    "signal": "set slurm.signal_before_s instead (the run needs SIGUSR1 to save and requeue)",
    "ntasks": "one task per grid point; --gpus-per-run N runs torchrun with N processes inside it",
    "wrap": "ftsgd writes the job script",
    "parsable": "ftsgd reads the job id",
    "wait": "use ftsgd sweep --wait",
}
"""sbatch options ``--slurm-opt`` may not set, and why."""

_KEY = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class TaskState:
    """One array task as squeue shows it."""

    task: int
    job: str
    """``ARRAYJOB_TASK``: what ``scancel`` and ``scontrol`` take."""
    state: str
    reason: str


def find_command(name: str) -> str:
    """The path of one of Slurm's commands.

    Raises:
        UsageError: it is not on PATH (not a Slurm login node, or its module is not loaded).
    """
    path = shutil.which(name)
    if path is None:
        raise UsageError(
            f"--slurm: `{name}` not found on PATH; run ftsgd sweep --slurm on a Slurm login node (or load "
            "its module), or drop --slurm to train on this machine"
        )
    return path


def parse_slurm_option(text: str) -> tuple[str, str]:
    """``--slurm-opt KEY=VALUE`` (or a bare ``KEY`` for a flag such as ``exclusive``) as (key, value).

    Keys are sbatch's long option names; ``cpus_per_task`` and ``--cpus-per-task`` are accepted too.

    Raises:
        UsageError: a malformed key, a value on several lines, or an option ftsgd sets itself.
    """
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("_", "-")
    if not _KEY.fullmatch(key):
        raise UsageError(
            f"--slurm-opt {text!r}: expected KEY=VALUE with an sbatch long option, e.g. partition=gpu"
        )
    if any(c in value for c in "\n\r\0"):
        raise UsageError(f"--slurm-opt {key}: the value must be one line")
    if key in OWN_OPTIONS:
        raise UsageError(f"--slurm-opt {key}: ftsgd sets it itself ({OWN_OPTIONS[key]})")
    return key, value if sep else ""


def submit(script: Path, tasks: list[int]) -> str:
    """``sbatch --parsable --array=TASKS script``; the array's job id.

    Raises:
        UsageError: sbatch refused the job (an unknown partition, a rejected option, a time limit over the
            partition's): its own message, nothing was submitted.
    """
    sbatch = find_command("sbatch")
    command = [sbatch, "--parsable", f"--array={array_spec(tasks)}", str(script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunError(f"sbatch did not answer ({first_line(exc)}); nothing was submitted") from None
    if done.returncode:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").replace(
            "sbatch: error: ", ""
        )
        raise UsageError(
            f"sbatch refused the sweep's job array: {message}\nNothing was submitted; fix the --slurm-opt "
            f"values or the recipe's [slurm] table (the job script is {script})"
        )
    return done.stdout.strip().split(";")[0]


def array_spec(tasks: list[int]) -> str:
    """``1-3,5,7-8`` for tasks 1, 2, 3, 5, 7, 8 (sbatch's ``--array`` syntax, short on big sweeps)."""
    ranges: list[list[int]] = []
    for task in sorted(tasks):
        if ranges and task == ranges[-1][1] + 1:
            ranges[-1][1] = task
        else:
            ranges.append([task, task])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def sweep_tasks(name: str) -> dict[int, TaskState]:
    """The array tasks Slurm still knows under job name ``name`` (this user's), the newest per task.

    Raises:
        RunError: squeue failed (the controller is down or does not answer).
    """
    squeue = find_command("squeue")
    command = [squeue, "-h", "-r", "-t", "all", f"--name={name}", f"--user={getpass.getuser()}"]
    command += ["-o", "%K|%i|%T|%r|%A"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunError(f"squeue did not answer ({first_line(exc)}); try again when Slurm answers") from None
    if done.returncode:
        raise RunError(f"squeue failed: {first_line(done.stderr.strip() or done.stdout)}; try again later")
    tasks: dict[int, tuple[int, TaskState]] = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        task, job, state, reason, unique = int(parts[0]), parts[1], parts[2], parts[3], parts[4]
        order = int(unique) if unique.isdigit() else 0
        if task not in tasks or order > tasks[task][0]:
            tasks[task] = (order, TaskState(task, job, state.split()[0], reason))
    return {task: state for task, (_, state) in tasks.items()}
