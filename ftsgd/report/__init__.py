"""``ftsgd report``: the paper's selection over runs, its tables and plots (torch-free)."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "run_report": "tables",
        "build_report": "selection",
        "collect_report": "selection",
        "write_plots": "plots",
    },
)
