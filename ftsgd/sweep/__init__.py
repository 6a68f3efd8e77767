"""``ftsgd sweep``: the paper's tuning protocol, resumable and safe to rerun."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "SweepOptions": "plan",
        "sweep_command": "command",
    },
)
