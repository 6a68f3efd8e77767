"""The run directory (its files, its lock, the resume policy), finding and reading runs, every recipe check."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "RunDir": "rundir",
        "locked": "rundir",
        "find_run_dirs": "collect",
        "read_runs": "collect",
        "load_checked_recipe": "checks",
    },
)
