"""A safetensors file written one tensor at a time, each float tensor cast to another dtype as it goes.

An export of bf16 weights is written in float32, so timm and every downstream tool load it as before.
``safetensors.torch.save_file`` needs every tensor at once, so casting first would hold a float32 copy
of the whole model (2x the bf16 weights, 1.1 GiB on ViT-L) at the end of each best epoch, the peak of a
run meant to stay below the float32 weights. The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range (padded
with spaces to a multiple of 8), then the raw little-endian bytes in that order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["write_safetensors"]


def _dtype_names() -> dict[torch.dtype, str]:
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


def write_safetensors(
    fh: IO[bytes],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    float_dtype: torch.dtype | None,
    replace: dict[str, Callable[[], torch.Tensor]] | None = None,
) -> None:
    """Write ``tensors`` (CPU, contiguous) to ``fh`` as safetensors, floating-point ones as ``float_dtype``
    (None: each in its own dtype).

    Only one tensor's cast copy exists at a time. The header (offsets) is computed from shapes alone.
    ``replace``: for some names, a function giving the tensor to write instead (same shape and dtype),
    called as its turn comes, so those too exist one at a time (LoRA's merged weights).
    """
    names = _dtype_names()
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        dtype = float_dtype if float_dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * dtype.itemsize
        header[name] = {
            "dtype": names[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    fh.write(struct.pack("<Q", len(text)))
    fh.write(text)
    for name, tensor in tensors.items():
        if replace and name in replace:
            tensor = replace[name]()
        value = tensor.to(float_dtype) if float_dtype is not None and tensor.is_floating_point() else tensor
        fh.write(value.contiguous().reshape(-1).view(dtype=_bytes_dtype()).numpy().data)
        del value


def _bytes_dtype() -> torch.dtype:
    import torch

    return torch.uint8
