"""Handing a stopped run back to Slurm: ``scontrol requeue`` of the task it runs in.

A Slurm task that ``ftsgd sweep --slurm`` submitted asks for SIGUSR1 some minutes before its time limit
(or a preemption). The run then saves a checkpoint like for any stop signal, and this module requeues the
task, so Slurm starts it again later and ``ftsgd train --resume`` continues from that checkpoint. Only the
job script that ftsgd writes sets :data:`REQUEUE_ENV`: a run a user started under their own ``sbatch``
script is never requeued behind their back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from ftsgd.errors import first_line

__all__ = ["REQUEUE_ENV", "requeue_task"]

REQUEUE_ENV = "FTSGD_SLURM_REQUEUE"
"""Set to 1 by the job script of ``ftsgd sweep --slurm``: SIGUSR1 requeues the task after the checkpoint."""


def slurm_task() -> str:
    """This Slurm task's id for ``scontrol`` (``ARRAYJOB_TASK`` for an array task), or "" outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


def requeue_task(signum: int) -> str:
    """Requeue this Slurm task when ``signum`` is SIGUSR1 and the job script asked for it.

    Called after the checkpoint is on disk. Slurm stops the task's processes once it is requeued, which is
    why nothing of value may come after this call.

    Returns:
        A sentence for the run's stop message ("" when there was nothing to requeue).
    """
    if signum != signal.SIGUSR1 or os.environ.get(REQUEUE_ENV) != "1":
        return ""
    task = slurm_task()
    if not task:
        return f"not requeued: {REQUEUE_ENV} is set but this is not a Slurm task (no SLURM_JOB_ID)"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"not requeued: scontrol is not on PATH; the next `ftsgd sweep --slurm` resubmits Slurm task {task}"
    try:
        done = subprocess.run(
            [scontrol, "requeue", task], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not requeued ({first_line(exc)}); the next `ftsgd sweep --slurm` resubmits Slurm task {task}"
    if done.returncode:
        why = first_line(done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")
        return f"not requeued ({why}); the next `ftsgd sweep --slurm` resubmits Slurm task {task}"
    return f"Slurm task {task} requeued: it continues from this checkpoint when Slurm starts it again"
