"""Reading weight files safely and streaming tensors into a model without a second copy.

Two promises shape this module:

* **Loading weights never runs code.** ``.safetensors`` files hold only tensors; pickle-based files
  (``.pth``/``.pt``/``.bin``/``.ckpt``) are read with ``torch.load(weights_only=True)``, which refuses
  any object that is not a tensor or a plain container. A file that needs more is refused with a
  :class:`~ftsgd.errors.WeightsError` rather than opened "just this once".
* **Loading weights never holds the model twice.** Safetensors tensors are read one at a time just
  before they are copied (:class:`LazyTensor`); memory-mapped ``.pth`` files and checkpoints hand their
  pages back as soon as a tensor is copied (:class:`MappedFile`). On ViT-L that is the difference
  between a 1.9 GiB and a 3 GiB peak.

Matching a state dict to a model (wrappers, prefixes, a re-initialised head) is :mod:`ftsgd.model.build`'s job.
"""

from __future__ import annotations

import contextlib
import os
import pickletools
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftsgd.errors import WeightsError, first_line

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "LazyTensor",
    "MappedFile",
    "copy_off_file",
    "load_checkpoint_state",
    "read_state_dict",
    "read_tensors",
    "resolve_weights_path",
    "stream_into",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
"""Pickle-based formats, always read with ``weights_only=True``."""

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "ema")
"""Keys under which training scripts nest the weights, in order of preference: the plain (non-EMA)
weights first, because that is what the checkpoint's ``state_dict`` means when both are present."""

_DIR_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
"""Files looked for when ``--weights`` names a directory (an ftsgd export or a hub snapshot)."""

_CONVERT_HINT = (
    "If you trust the file, convert its tensors to safetensors once and pass that file instead:\n"
    '  python -c "import torch, safetensors.torch as st; '
    "ck = torch.load('{path}', weights_only=False); sd = ck.get('state_dict', ck); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
    "'weights.safetensors')\""
)


# --------------------------------------------------------------------------------------------------
# Reading weight files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _corrupt(path: Path, detail: str) -> WeightsError:
    return WeightsError(
        f"could not read weights file {path}: it is truncated or not a valid weights file ({detail}). "
        "Re-download or re-export it; ftsgd reads .safetensors and PyTorch .pth/.pt/.bin/.ckpt files."
    )


def _pickle_globals(path: Path, limit_bytes: int = 256 * 2**20) -> list[str] | None:
    """Names of the classes/functions a plain pickle file would import, found without unpickling.

    ``pickletools.genops`` only parses opcodes; nothing is imported or called. Returns ``None`` when
    the file is not a parseable pickle (so it is corrupt rather than unsafe).
    """
    if path.stat().st_size > limit_bytes:
        return None
    names: list[str] = []
    strings: list[str] = []
    try:
        with path.open("rb") as fh:
            for opcode, arg, _pos in pickletools.genops(fh):
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<global>")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return None
    return names


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with errors translated into actionable WeightsErrors."""
    import argparse
    import pickle

    # timm's train.py stores its argparse Namespace next to the weights; it is a plain attribute
    # bag whose reconstruction runs no user code, so allowing it keeps timm checkpoints usable.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    ctx = safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()
    try:
        with ctx, warnings.catch_warnings():
            # torch warns about pickle protocols it merely might not parse; the outcome is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:  # zip-format files: tensors stay in the page cache until copied into the model
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if not found and "Unsupported operand" in str(exc):
            # Not torch's format; maybe a raw pickle. Inspect it without executing anything.
            found = _pickle_globals(path) or []
        if found:
            shown = ", ".join(dict.fromkeys(found[:5]))
            raise WeightsError(
                f"refusing to load {path}: the file contains Python objects other than tensors "
                f"({shown}); ftsgd only loads tensors, because unpickling other objects can run "
                f"arbitrary code. {_CONVERT_HINT.format(path=path)}"
            ) from None
        # Quote only the parser's complaint: torch's surrounding advice (retry with
        # weights_only=False) is exactly what must not be done with an unknown file.
        lines = [ln.strip() for ln in str(exc).split("WeightsUnpickler error:", 1)[-1].splitlines()]
        detail = next((ln for ln in lines if ln), "") if "WeightsUnpickler error:" in str(exc) else ""
        raise _corrupt(path, detail or "not a PyTorch weights file") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as exc:
        detail = "the file is empty" if isinstance(exc, EOFError) else first_line(exc)
        raise _corrupt(path, detail) from None


def _find_state_dict(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    """Peel training-script wrappers off a loaded checkpoint and keep only the tensors."""
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            found = _find_state_dict(inner, depth + 1)
            if found:
                return found
    tensors = {
        k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor | LazyTensor)
    }
    return tensors or None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class LazyTensor:
    """A tensor of a safetensors file known by its shape until :meth:`load` reads it.

    Matching a file to a model needs only names and shapes. Reading each tensor with a plain file
    read just before it is copied into the model keeps one tensor in memory instead of a second copy
    of the whole model; a memory map (``safe_open``) would leave every page it touched resident in the
    process until the file is closed, which costs the same as loading everything (1.1 GiB on ViT-L).
    """

    __slots__ = ("_path", "dtype", "nbytes", "offset", "shape")

    def __init__(self, path: Path, dtype: torch.dtype, shape: list[int], offset: int, nbytes: int) -> None:
        self._path = path
        self.dtype = dtype
        self.shape = torch.Size(shape)
        self.offset = offset
        self.nbytes = nbytes

    def load(self) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            view = tensor.view(-1).view(torch.uint8).numpy()
            with self._path.open("rb") as fh:
                fh.seek(self.offset)
                if fh.readinto(view) != self.nbytes:
                    raise _corrupt(self._path, "a tensor's data ends past the end of the file")
        return tensor


def _lazy_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Parse a safetensors header (8-byte little-endian length + JSON) into lazy tensors.

    The format is a header then raw little-endian tensor bytes; checking every tensor's byte range
    against the file size here catches a truncated file before anything is loaded.
    """
    import json
    import struct

    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("incomplete metadata, file not fully covered")
            header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        tensors = {}
        for key, info in header.items():
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"unsupported dtype {info['dtype']!r} for {key!r}")
            if not 0 <= begin <= end or data_start + end > size:
                raise ValueError(f"incomplete file: {key!r} ends past the end of the file")
            expected = dtype.itemsize * int(torch.Size(info["shape"]).numel())
            if end - begin != expected:
                raise ValueError(f"{key!r} has {end - begin} bytes, its shape needs {expected}")
            tensors[key] = LazyTensor(path, dtype, info["shape"], data_start + begin, end - begin)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, OSError) as exc:
        raise _corrupt(path, first_line(exc)) from None
    return tensors


def resolve_weights_path(path: Path | str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for name in _DIR_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(
            f"weights directory {path} holds none of {', '.join(_DIR_WEIGHT_NAMES)}; "
            "pass the weights file itself with --weights PATH"
        )
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; check the path given with --weights (model.weights)"
        )
    return path


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Read the tensors of a weights file without executing any code from it.

    Args:
        path: A ``.safetensors`` file, a PyTorch ``.pth``/``.pt``/``.bin``/``.ckpt``/``.pth.tar``
            file, or a directory holding ``model.safetensors`` (an ftsgd export) or
            ``pytorch_model.bin``.

    Returns:
        The weights as ``name -> tensor`` on the CPU. Common wrappers (``state_dict``, ``model``,
        ``model_state_dict``, ``module``, EMA copies) are unwrapped, preferring the plain weights,
        and non-tensor entries (``epoch``, ``args``, optimizer state) are ignored. Key prefixes such
        as ``module.`` are left for :func:`ftsgd.model.build.load_weights`, which strips them only if that makes the
        keys match the model.

    Raises:
        WeightsError: The file is missing, has an unknown extension, is truncated or corrupt,
            holds no tensors, or would need to unpickle Python objects other than tensors.
    """
    return {k: v.load() if isinstance(v, LazyTensor) else v for k, v in read_tensors(path).items()}


def read_tensors(path: Path | str) -> dict[str, Any]:
    """Like :func:`read_state_dict`, but a safetensors file's tensors stay unread (:class:`LazyTensor`)."""
    path = resolve_weights_path(path)
    suffix = _suffix(path)
    if suffix in SAFETENSORS_SUFFIXES:
        raw: Any = _lazy_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _torch_load(path)
    else:
        raise WeightsError(
            f"unknown weights file type {path.name!r}: ftsgd reads .safetensors and PyTorch "
            f"{'/'.join(PICKLE_SUFFIXES)} files; rename the file if it is one of these"
        )
    state_dict = _find_state_dict(raw)
    if not state_dict:
        kind = type(raw).__name__
        keys = f" (top-level keys: {', '.join(map(str, list(raw)[:10]))})" if isinstance(raw, Mapping) else ""
        raise WeightsError(
            f"weights file {path} contains no tensors ({kind}{keys}); expected a state dict of "
            "name -> tensor, possibly under 'state_dict' or 'model'"
        )
    return state_dict


# --------------------------------------------------------------------------------------------------
# Streaming tensors into a model


def stream_into(model: nn.Module, state_dict: dict[str, Any], mapped: MappedFile | None = None) -> None:
    """``load_state_dict`` one module at a time, reading each lazy tensor just before it is copied.

    Going through ``load_state_dict`` keeps every module's own loading hooks, and it copies into the
    model's own tensors (``param.copy_``), so parameters keep their identity. Going module by module
    bounds the extra memory to one module's tensors instead of a second copy of the whole model
    (1.1 GiB on ViT-L), which would otherwise become the peak of a low-memory run. Tensors of a
    memory-mapped file (``mapped``) hand their pages back as soon as they are copied.
    """
    groups: dict[str, list[str]] = {}
    for key in state_dict:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    for keys in groups.values():
        chunk = {}
        for key in keys:
            value = state_dict.pop(key)
            chunk[key] = value.load() if isinstance(value, LazyTensor) else value
        model.load_state_dict(chunk, strict=False)
        if mapped is not None:
            mapped.release(chunk.values())
        del chunk


class MappedFile:
    """Where a file is memory-mapped in this process, to hand back the pages of tensors once copied.

    ``torch.load(mmap=True)`` maps the whole file privately, and every page a copy reads stays in the
    process's resident set until the last tensor of the file is gone: copying a ViT-L ``.pth`` into the
    model that way costs as much peak memory as loading it outright (+1.1 GiB). Nothing ever writes to
    these pages, so ``madvise(MADV_DONTNEED)`` can drop them; touched again, they are re-read from the
    file. Only addresses inside this file's mappings are ever released; elsewhere (other systems, a
    file that is not mapped, tensors created by timm's filters) this does nothing.
    """

    _MADV_DONTNEED = 4

    def __init__(self, path: Path) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise: Any = None
        if not sys.platform.startswith("linux"):
            return
        real = os.path.realpath(path)
        with contextlib.suppress(OSError, ValueError), open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == real:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    self.ranges.append((lo, hi))
        if self.ranges:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            self._madvise = libc.madvise
            self._page = os.sysconf("SC_PAGE_SIZE")

    def contains(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in the file's mapping."""
        start = tensor.untyped_storage().data_ptr()
        return any(lo <= start < hi for lo, hi in self.ranges)

    def release(self, tensors: Iterable[Any]) -> None:
        """Drop the resident pages of those ``tensors`` that lie in the mapping.

        Only pages wholly inside a tensor's storage are dropped, so a neighbouring tensor is never
        touched (a page it shares stays resident: a few KiB per tensor).
        """
        if self._madvise is None:
            return
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            begin = -(-start // self._page) * self._page
            end -= end % self._page
            if end > begin and any(lo <= begin and end <= hi for lo, hi in self.ranges):
                self._madvise(begin, end - begin, self._MADV_DONTNEED)


def load_checkpoint_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state_dict)`` (strict) for a checkpoint loaded with ``torch.load(mmap=True)``.

    Copies module by module and hands the file's pages back as it goes, so resuming never holds the
    checkpoint's weights next to the model's. Empties ``state_dict``.
    """
    if set(state_dict) != set(model.state_dict()):
        model.load_state_dict(state_dict)  # raises torch's usual missing/unexpected keys error
    stream_into(model, state_dict, MappedFile(path))


def copy_off_file(obj: Any, path: Path) -> Any:
    """``obj`` (nested dicts/lists/tuples) with every tensor memory-mapped from ``path`` copied to memory.

    ``optimizer.load_state_dict`` keeps the tensors it is given (momentum buffers) when their dtype and
    device already fit: tensors of a memory-mapped checkpoint would keep the whole file mapped, and the
    replaced checkpoint on disk, for the whole run. Copies one tensor at a time, handing its pages back.
    """
    mapped = MappedFile(path)

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if not mapped.contains(value):
                return value
            owned = value.clone()
            mapped.release([value])
            return owned
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return copy(obj) if mapped.ranges else obj
