"""A fine-tuned model in use: export, evaluation, prediction and ONNX."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "export_model": "export",
        "load_exported_model": "export",
        "evaluate": "evaluate",
        "Predictor": "predict",
        "export_onnx": "onnx_export",
    },
)
