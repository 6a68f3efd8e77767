"""``ftsgd inspect``: the embedding found, memory estimates, the gradient diagnostic."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "inspect_model": "inspection",
        "estimate_memory": "memory",
        "gradient_diagnostic": "diagnose",
    },
)
