"""``ftsgd sweep``: plan, check, run and conclude.

The steps are separate modules: :mod:`~ftsgd.sweep.plan` (the grid points, resolved), :mod:`~ftsgd.sweep.record`
(the ``--out`` folder and ``sweep.json``), :mod:`~ftsgd.sweep.jobs` (training them as subprocesses) or
:mod:`~ftsgd.sweep.inprocess` (in this process), :mod:`~ftsgd.sweep.output` (what is printed).
"""

from __future__ import annotations

import signal
from typing import Any

from ftsgd.errors import Interrupted, RunError
from ftsgd.run.rundir import locked
from ftsgd.sweep.jobs import Stop, execute, make_slots
from ftsgd.sweep.output import (
    announce,
    failure_summary,
    incomplete_summary,
    print_pending_commands,
    print_sweep_report,
)
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.sweep.record import (
    FAILED,
    FINISHED,
    INCOMPLETE,
    INTERRUPTED,
    PENDING,
    Sweep,
    check_out_dir,
    collect_sweep_report,
    open_sweep,
    read_previous,
    status_counts,
    sweep_document,
)
from ftsgd.utils import console


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
    plan = plan_sweep(opts)
    if opts.print_commands:
        check_out_dir(plan, read_previous(plan.out), opts.allow_changed_grid)
        return print_pending_commands(plan, opts.as_json)
    with locked(plan.out, "sweep directory"):
        sweep = open_sweep(plan, opts)
        announce(sweep)
        stop = execute(sweep, make_slots(opts))
        return conclude(sweep, stop)


def conclude(sweep: Sweep, stop: Stop, *, show: bool = True) -> dict[str, Any]:
    """Write the final ``sweep.json`` and plots, print the report (``show``), and raise for failures or a stop.

    Returns:
        ``sweep.json``'s content.
    """
    counts = status_counts(sweep)
    left = counts[PENDING] + counts[INTERRUPTED]
    sweep.state = (
        INTERRUPTED if stop.count else FAILED if counts[FAILED] else INCOMPLETE if left else FINISHED
    )
    opts = sweep.opts
    sweep.report = collect_sweep_report(
        sweep.plan, sweep.records, metric=opts.metric, select_by=opts.select_by
    )
    if sweep.opts.png is not None and sweep.report is not None:
        from ftsgd.report.plots import write_plots

        sweep.plots = write_plots(sweep.report, sweep.opts.png)
    sweep.write()
    document = sweep_document(sweep)
    if show and sweep.opts.as_json:
        console.print_json(document)
    elif show:
        print_sweep_report(sweep)
    if stop.count:
        name = signal.Signals(stop.signum).name
        raise Interrupted(
            f"sweep interrupted by {name}: its running runs were stopped (a run stopped while training saves "
            f"its checkpoint); run the same command again to continue ({counts[FINISHED]} of "
            f"{len(sweep.plan.runs)} runs finished)",
            stop.signum,
        )
    if counts[FAILED]:
        raise RunError(failure_summary(sweep))
    if sweep.state == INCOMPLETE:
        raise RunError(incomplete_summary(sweep))
    return document
