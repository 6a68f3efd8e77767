"""The fine-tuning loop (``Trainer``) and what it drives: parallelism, regularisers, tracking."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Trainer": "trainer",
    },
)
