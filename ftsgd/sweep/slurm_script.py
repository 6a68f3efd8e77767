"""The job script ``ftsgd sweep --slurm`` submits: one Slurm array task per grid point, readable by hand.

The script lists every grid point of the sweep (task N trains point N, the sweep's own numbering) and is
submitted with ``sbatch --array=<the points to run>``, so resubmitting it by hand, whole or for some tasks
(``sbatch --array=3,5 job.sh``), is always safe: each task runs ``ftsgd train ... --resume`` in its own
run directory, where a finished point does nothing and an interrupted one continues from its checkpoint.

Why a bash wrapper around the run, not ``exec``: the task must leave its exit status behind
(``slurm/exit/N``: the next ``ftsgd sweep`` tells a failed point from an interrupted one after Slurm has
forgotten the job), and Slurm's early-warning signal (``--signal=B:USR1@N`` reaches the batch shell only)
must be passed on to the run, which saves a checkpoint and requeues the task.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ftsgd.sweep.plan import Plan, PlannedRun
from ftsgd.sweep.record import log_path
from ftsgd.train.requeue import REQUEUE_ENV
from ftsgd.train.tracking_base import GROUP_ENV, TAGS_ENV

SLURM_DIR = "slurm"
"""``OUT/slurm``: the job script, Slurm's own output per task, and each task's exit status."""
SCRIPT_NAME = "job.sh"
EXIT_DIR = "exit"


@dataclass(frozen=True)
class SlurmSettings:
    """What the job array asks Slurm for: sbatch options (long names, no dashes) and runs per point."""

    options: dict[str, str] = field(default_factory=dict)
    """sbatch long options without ``--`` (``partition``, ``gres``, ``time``, ...), in the order given."""
    gpus_per_run: int = 1
    """Processes per grid point; above 1 the point runs under ``torchrun`` inside its allocation."""
    signal_before_s: int = 300
    """When Slurm sends SIGUSR1 before the time limit (0: never)."""


def slurm_dir(out: Path) -> Path:
    return out / SLURM_DIR


def script_path(out: Path) -> Path:
    return slurm_dir(out) / SCRIPT_NAME


def exit_path(out: Path, index: int) -> Path:
    """``OUT/slurm/exit/N``: ``<exit status> <job id>`` of the last ended attempt of task N."""
    return slurm_dir(out) / EXIT_DIR / str(index)


def job_name(out: Path) -> str:
    """The array's Slurm job name: the sweep folder's name and a hash of its path (``squeue --name``
    finds the sweep's tasks even when the sweep was killed between ``sbatch`` and writing its record)."""
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in out.name)[:40]
    return f"ftsgd-{safe}-{digest}"


def run_argv(run: PlannedRun, gpus_per_run: int) -> list[str]:
    """The point's command: this interpreter running ``-m ftsgd train ...`` (under torchrun above 1 GPU)."""
    python = os.path.abspath(sys.executable)
    if gpus_per_run <= 1:
        return [python, "-m", "ftsgd", *run.args]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus_per_run}"]
    return [python, *torchrun, "-m", "ftsgd", *run.args]


def sbatch_lines(plan: Plan, settings: SlurmSettings) -> list[str]:
    """The ``#SBATCH`` lines: ftsgd's own (array, output, requeue, signal), then the user's options."""
    out = plan.out.resolve()
    lines = [
        f"--job-name={job_name(out)}",
        f"--array=1-{len(plan.runs)}",
        f"--output={slurm_dir(out)}/%A_%a.out",
        "--open-mode=append",
        "--requeue",
        "--ntasks=1",
    ]
    if settings.signal_before_s > 0:
        lines.append(f"--signal=B:USR1@{settings.signal_before_s}")
    lines += [f"--{key}={value}" if value != "" else f"--{key}" for key, value in settings.options.items()]
    return [f"#SBATCH {line}" for line in lines]


def case_entry(plan: Plan, run: PlannedRun, gpus_per_run: int) -> str:
    """One ``N) ...;;`` branch: the point's run directory, log, tracking group/tags and command."""
    out = plan.out.resolve()
    tags = json.dumps({"recipe": run.recipe, **run.values}, default=str)
    body = [
        f"LOG={shlex.quote(str(log_path(out, run)))}",
        f"export {GROUP_ENV}={shlex.quote(out.name)} {TAGS_ENV}={shlex.quote(tags)}",
        f"set -- {shlex.join(run_argv(run, gpus_per_run))}",
    ]
    lines = [f"{run.index})  # {run.recipe} {run.path.name}"] + [f"    {line}" for line in body] + ["    ;;"]
    return "\n".join(lines)


_BODY = """\
*)
    echo "ftsgd: no grid point $TASK in this sweep (tasks are 1-{count})" >&2
    exit 2
    ;;
esac

EXIT_FILE={exit_dir}/$TASK
mkdir -p {exit_dir} "$(dirname "$LOG")"
rm -f "$EXIT_FILE"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%S+00:00) Slurm task ${{SLURM_ARRAY_JOB_ID}}_$TASK" \\
    "(job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname): $*" >>"$LOG"

# The run in its own process group (job control): SIGUSR1 from Slurm reaches this shell only and is passed
# on to the whole group; the run saves a checkpoint and requeues this task. {launcher_comment}
set -m
forward() {{ kill -USR1 -- "-$child" 2>/dev/null; }}
trap forward USR1
trap : TERM  # scancel and the time limit signal every process of the task: the run saves; this shell waits
{launch} >>"$LOG" 2>&1 &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
rc=$?
printf '%s %s\\n' "$rc" "${{SLURM_ARRAY_JOB_ID}}_$TASK" >"$EXIT_FILE.tmp" && mv -f "$EXIT_FILE.tmp" "$EXIT_FILE"
exit "$rc"
"""


def job_script(plan: Plan, settings: SlurmSettings) -> str:
    """The whole job script for every grid point of ``plan`` (written to ``OUT/slurm/job.sh``)."""
    out = plan.out.resolve()
    exit_dir = shlex.quote(str(slurm_dir(out) / EXIT_DIR))
    if settings.gpus_per_run > 1:
        launch = '( trap "" USR1; exec "$@" )'
        comment = "torchrun ignores it (it\n# would die of it); its processes catch it."
    else:
        launch, comment = '"$@"', ""
    head = [
        "#!/bin/bash",
        f"# Written by `ftsgd sweep --slurm` for the sweep in {out}.",
        "# Task N trains grid point N with `ftsgd train ... --resume` in its own run directory, so any task",
        "# can be resubmitted by hand: `sbatch --array=2,5 job.sh` (a finished point does nothing).",
        *sbatch_lines(plan, settings),
        "",
        "set -u",
        f"export {REQUEUE_ENV}=1",
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then',
        '    export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"',
        "fi",
        'TASK="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}"',
        'case "$TASK" in',
    ]
    cases = [case_entry(plan, run, settings.gpus_per_run) for run in plan.runs]
    body = _BODY.format(count=len(plan.runs), exit_dir=exit_dir, launch=launch, launcher_comment=comment)
    return "\n".join([*head, *cases, body])
