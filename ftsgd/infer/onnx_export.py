"""``ftsgd export --onnx``: an export as an ONNX model, checked against PyTorch before it is kept.

The ONNX file takes the export's input size with a dynamic batch axis (input ``input``, output
``logits``), opset :data:`OPSET`, and carries the class names and preprocessing as metadata
(``onnxruntime``'s ``get_modelmeta().custom_metadata_map``). It is written to a temporary file next to
the target, run there with onnxruntime on a few real images (or random inputs) at two batch sizes and
compared with the PyTorch logits; only a model within :data:`ATOL` / :data:`RTOL` is renamed into place.

The ``onnx``, ``onnxruntime`` and ``onnxscript`` (torch's exporter) packages are optional:
``pip install 'ftsgd[onnx]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftsgd import __version__
from ftsgd.data.folders import iter_image_files
from ftsgd.data.images import load_image
from ftsgd.errors import DataError, RunError, UsageError, first_line
from ftsgd.infer.evaluate import logits_of
from ftsgd.infer.export import PREPROCESSING_KEYS, inference_transform
from ftsgd.utils.fileio import atomic_write_with, remove_stale_temps

__all__ = ["ATOL", "ONNX_PACKAGES", "OPSET", "RTOL", "export_onnx", "require_onnx_packages"]

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
"""What ``torch.onnx.export`` (its dynamo exporter needs onnxscript) and the check need."""
OPSET = 18
"""The default opset of torch's exporter; onnxruntime supports it since 1.14 (2023)."""
ATOL = 1e-4
RTOL = 1e-4
"""The check passes when every logit has ``|onnx - torch| <= ATOL + RTOL * |torch|`` (float32 noise
is ~1e-6; a wrong graph is off by far more)."""
CHECK_IMAGES = 8
_MAX_INLINE_BYTES = 2 * 1024**3 - 64 * 1024**2
"""A single ONNX file is one protobuf message, limited to 2 GiB (larger models need external data)."""


def require_onnx_packages() -> None:
    """Raise a usage error (exit 2) naming the install command when an ONNX package is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"ONNX export needs the package(s) {', '.join(missing)}: pip install 'ftsgd[onnx]'")


def check_inputs(meta: dict[str, Any], data: Path | None, n: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """The images the ONNX model is checked on, preprocessed as for evaluation, and where they came from.

    Args:
        meta: The export's metadata (preprocessing).
        data: A folder whose first ``n`` image files (recursively, sorted) are used; None for seeded
            random inputs of the export's input size.
    """
    if data is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, *meta["input_size"], generator=g), f"{n} random inputs"
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder")
    transform = inference_transform(meta)
    files = list(islice(iter_image_files(data, on_error=_skip_unlistable), n))
    if not files:
        raise UsageError(f"--data {data} holds no image files to check the ONNX model on")
    try:
        images = torch.stack([transform(load_image(f)) for f in files])
    except DataError as exc:
        raise DataError(f"{exc} (--data: the images the ONNX model is checked on)") from None
    return images, f"{len(files)} images from {data}"


def _skip_unlistable(_exc: OSError) -> None:
    """A sub-folder that cannot be listed just contributes no check images."""


def to_onnx(model: nn.Module, meta: dict[str, Any], *, opset: int = OPSET) -> Any:
    """Trace ``model`` with torch's dynamo exporter: dynamic batch, the export's input size, metadata.

    Raises:
        UsageError: The model is too large for a single ONNX file.
        RunError: torch cannot export this architecture.
    """
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > _MAX_INLINE_BYTES:
        raise UsageError(
            f"{meta['architecture']} has {size / 1024**3:.2f} GiB of weights; one ONNX file holds at most 2 GiB "
            "and ftsgd does not write ONNX external-data files"
        )
    example = torch.zeros(2, *meta["input_size"])  # batch 2: torch.export specialises a batch of 1
    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines must not mix with --json output
            program = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except Exception as exc:
        raise RunError(
            f"torch {torch.__version__} could not export {meta['architecture']} to ONNX: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    program.model.metadata_props.update(_metadata(meta))
    return program


def _metadata(meta: dict[str, Any]) -> dict[str, str]:
    """String metadata for the ONNX file: what a consumer needs to preprocess and label."""
    out = {"architecture": str(meta["architecture"]), "class_names": json.dumps(list(meta["class_names"]))}
    for key in PREPROCESSING_KEYS:
        value = meta[key]
        out[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
    out["ftsgd_version"] = __version__
    return out


def compare_with_torch(onnx_path: Path, model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime on ``inputs`` (all at once, then the first alone) against PyTorch.

    Returns:
        ``max_abs_diff`` over all logits, the ``batch_sizes`` run, and ``passed``.
    """
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = logits_of(model.eval(), inputs, device=torch.device("cpu")).numpy()
    worst, passed, sizes = 0.0, True, sorted({len(inputs), 1}, reverse=True)
    for size in sizes:
        (got,) = session.run(["logits"], {"input": inputs[:size].numpy()})
        want = reference[:size]
        diff = np.abs(got - want)
        worst = max(worst, float(diff.max()))
        passed = passed and got.shape == want.shape and bool((diff <= ATOL + RTOL * np.abs(want)).all())
    return {"max_abs_diff": worst, "batch_sizes": sizes, "passed": passed}


class _CheckedWrite:
    """Saves the ONNX program to the temporary file and checks it there, before the atomic rename."""

    def __init__(self, program: Any, model: nn.Module, inputs: torch.Tensor) -> None:
        self.program, self.model, self.inputs = program, model, inputs
        self.check: dict[str, Any] = {}

    def __call__(self, tmp: Path) -> None:
        self.program.save(str(tmp), external_data=False)
        self.check = compare_with_torch(tmp, self.model, self.inputs)
        if not self.check["passed"]:
            raise RunError(
                f"the ONNX model's logits differ from PyTorch's by up to {self.check['max_abs_diff']:.3g} "
                f"(tolerance |onnx - torch| <= {ATOL:g} + {RTOL:g} * |torch|); nothing was written"
            )


def export_onnx(
    model: nn.Module, meta: dict[str, Any], out: Path, *, data: Path | None = None, opset: int = OPSET
) -> dict[str, Any]:
    """Write ``out`` as the ONNX version of an exported model, checked against PyTorch first.

    Args:
        model: The model from :func:`ftsgd.export.load_exported_model` (CPU).
        meta: Its metadata.
        out: The ``.onnx`` file to create or replace (atomically; its folder is created).
        data: A folder of images to check on (default: random inputs).
        opset: ONNX opset.

    Returns:
        What was written and the check's numbers (``max_abs_diff``, ``batch_sizes``, ``checked_on``).

    Raises:
        UsageError: ``out`` is a folder, ``data`` has no images, or the model is over 2 GiB.
        RunError: torch cannot export the model, the check failed, or the file could not be written.
    """
    if out.is_dir():
        raise UsageError(f"--onnx {out} is a folder; give the .onnx file to write")
    inputs, source = check_inputs(meta, data)  # a bad --data fails before minutes of tracing
    program = to_onnx(model.cpu(), meta, opset=opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, [out.name])  # a model-sized file left by a killed export
    writer = _CheckedWrite(program, model, inputs)
    atomic_write_with(out, writer)
    return {
        "onnx": str(out),
        "bytes": out.stat().st_size,
        "opset": opset,
        "input": ["batch", *meta["input_size"]],
        "classes": len(meta["class_names"]),
        "checked_on": source,
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        **writer.check,
    }
