"""How a sweep ends: the final ``sweep.json``, plots and report, and the exit for failures or a stop.

Shared by the local sweep (:mod:`~ftsgd.sweep.command`) and the Slurm one (:mod:`~ftsgd.sweep.slurm_command`).
"""

from __future__ import annotations

import signal
from typing import Any

from ftsgd.errors import Interrupted, RunError
from ftsgd.sweep.jobs import Stop
from ftsgd.sweep.output import failure_summary, incomplete_summary, print_sweep_report
from ftsgd.sweep.record import (
    FAILED,
    FINISHED,
    INCOMPLETE,
    INTERRUPTED,
    PENDING,
    Sweep,
    collect_sweep_report,
    status_counts,
    sweep_document,
)
from ftsgd.utils import console


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
