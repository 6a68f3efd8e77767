"""The fine-tuning loop (``Trainer``) and what it drives: stages, checkpoint state, exits, parallelism,
regularisers, tracking."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Trainer": "trainer",
    },
)
