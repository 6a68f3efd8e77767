"""``ftsgd sweep``: plan, check, run and conclude.

The steps are separate modules: :mod:`~ftsgd.sweep.plan` (the grid points, resolved), :mod:`~ftsgd.sweep.record`
(the ``--out`` folder and ``sweep.json``), :mod:`~ftsgd.sweep.jobs` (training them as subprocesses) or
:mod:`~ftsgd.sweep.inprocess` (in this process) or :mod:`~ftsgd.sweep.slurm_command` (as Slurm tasks),
:mod:`~ftsgd.sweep.output` (what is printed), :mod:`~ftsgd.sweep.conclude` (the end).
"""

from __future__ import annotations

from typing import Any

from ftsgd.run.rundir import locked
from ftsgd.sweep.conclude import conclude
from ftsgd.sweep.jobs import execute, make_slots
from ftsgd.sweep.output import announce, print_pending_commands
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.sweep.record import check_out_dir, open_sweep, read_previous
from ftsgd.sweep.slurm_command import check_slurm_usage, slurm_sweep_command

__all__ = ["conclude", "sweep_command"]


def sweep_command(opts: SweepOptions) -> dict[str, Any]:
    """``ftsgd sweep``: plan and check every run, then train what is not finished, then report.

    Returns:
        ``sweep.json``'s content (or, with ``--print-commands``, the commands printed).

    Raises:
        UsageError: Bad usage, any grid point's recipe, a changed grid or a run directory holding another
            recipe; all found before any run starts.
        RunError: Some runs failed (the others were trained), or some are left unfinished (stopped from
            outside, or trained by another process that holds their lock): exit 1 either way, the message
            says which; the same command continues them.
        Interrupted: SIGINT/SIGTERM stopped the sweep after its running runs stopped (saving checkpoints).
    """
    check_slurm_usage(opts)
    if opts.slurm:
        return slurm_sweep_command(opts)
    plan = plan_sweep(opts)
    if opts.print_commands:
        check_out_dir(plan, read_previous(plan.out), opts.allow_changed_grid)
        return print_pending_commands(plan, opts.as_json)
    with locked(plan.out, "sweep directory"):
        sweep = open_sweep(plan, opts)
        announce(sweep)
        stop = execute(sweep, make_slots(opts))
        return conclude(sweep, stop)
