"""``ftsgd sweep``: the paper's tuning protocol, resumable and safe to rerun."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "SweepOptions": "plan",
        "plan_sweep": "plan",
        "sweep_command": "command",
        "execute_in_process": "inprocess",
        "run_comparison": "compare",
    },
)
