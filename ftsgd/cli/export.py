"""``ftsgd export --onnx``: an exported model as ONNX, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftsgd.errors import UsageError
from ftsgd.infer.export import load_exported_model
from ftsgd.infer.onnx_export import export_onnx, require_onnx_packages
from ftsgd.inspect.memory import format_bytes
from ftsgd.utils import console


def export_command(weights: Path, *, onnx: Path, data: Path | None = None) -> dict[str, Any]:
    """``ftsgd export --onnx``: the export as an ONNX file, checked with onnxruntime against PyTorch."""
    require_onnx_packages()  # before anything is loaded
    if data is not None and not data.expanduser().is_dir():
        raise UsageError(f"--data {data} is not a folder")
    model, meta = load_exported_model(weights)
    return export_onnx(model, meta, onnx.expanduser(), data=data.expanduser() if data else None)


def print_export(r: dict[str, Any]) -> None:
    """What ``ftsgd export --onnx`` wrote and how it was checked."""
    console.print_kv(
        [
            ("onnx", f"{r['onnx']} ({format_bytes(r['bytes'])}, opset {r['opset']})"),
            (
                "input",
                f"{'x'.join(str(v) for v in r['input'])} (dynamic batch) -> logits for {r['classes']} classes",
            ),
            (
                "checked",
                f"{r['checked_on']} at batch sizes {', '.join(map(str, r['batch_sizes']))}: max |onnx - torch| = "
                f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']['atol']:g} + {r['tolerance']['rtol']:g} x |torch|)",
            ),
        ]
    )
