"""The model a recipe fine-tunes: built by timm, weights loaded, embedding found and frozen, its optimizer."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "build_model": "build",
        "prepare_model": "prepare",
        "PreparedModel": "prepare",
        "find_embedding": "embedding",
        "frozen_parameter_names": "freeze",
        "build_optimizer": "optim",
        "read_state_dict": "weights",
    },
)
