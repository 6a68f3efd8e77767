"""Building timm models and loading local weight files safely.

Two promises shape this module:

* **Loading weights never runs code.** ``.safetensors`` files hold only tensors; pickle-based files
  (``.pth``/``.pt``/``.bin``/``.ckpt``) are read with ``torch.load(weights_only=True)``, which refuses
  any object that is not a tensor or a plain container. A file that needs more is refused with a
  :class:`~ftsgd.errors.WeightsError` rather than opened "just this once".
* **A weights file either fits the model or is rejected with the reason.** Checkpoints come wrapped
  (``{"state_dict": ...}``, DDP's ``module.`` prefix, ``torch.compile``'s ``_orig_mod.``); those
  wrappers are removed. The one expected mismatch, an ImageNet classifier on a model built for a new
  number of classes, is re-initialised and reported. Any other shape mismatch means the file is for a
  different architecture and fine-tuning from it would silently start from random weights, so it is
  an error listing the offending tensors.

``pretrained=True`` downloads from the Hugging Face hub through timm. Offline, huggingface_hub retries
for most of a minute before failing, so the hub is probed first (with a short timeout) and, when it is
unreachable and the weights are not already cached, the user is told to pass a local ``--weights``
file instead.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import os
import pickletools
import re
import socket
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ftsgd.errors import ModelError, WeightsError
from ftsgd.recipe import ModelConfig

__all__ = [
    "WeightsReport",
    "build_model",
    "load_weights",
    "model_data_config",
    "read_state_dict",
    "unwrap_model",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
"""Pickle-based formats, always read with ``weights_only=True``."""

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "ema")
"""Keys under which training scripts nest the weights, in order of preference: the plain (non-EMA)
weights first, because that is what the checkpoint's ``state_dict`` means when both are present."""

_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Prefixes added by DDP, ``torch.compile`` and Lightning-style wrappers."""

_DIR_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
"""Files looked for when ``--weights`` names a directory (an ftsgd export or a hub snapshot)."""

_MAX_LISTED = 10
_PROBE_TIMEOUT_S = 3.0
"""How long the hub connectivity probe may take before the hub counts as unreachable."""

_CONVERT_HINT = (
    "If you trust the file, convert its tensors to safetensors once and pass that file instead:\n"
    '  python -c "import torch, safetensors.torch as st; '
    "ck = torch.load('{path}', weights_only=False); sd = ck.get('state_dict', ck); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
    "'weights.safetensors')\""
)


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_weights` did, for the run log and the CLI summary."""

    path: str
    loaded: int
    """Number of tensors copied into the model."""
    missing: tuple[str, ...]
    """Model keys absent from the file (they keep their fresh initialisation)."""
    unexpected: tuple[str, ...]
    """File keys the model does not have (ignored)."""
    reinitialised: tuple[str, ...]
    """Classifier keys dropped because their shape differs: the head is re-initialised for the task."""


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        detail = "the file is empty" if isinstance(exc, EOFError) else _first_line(exc)
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
        k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor | _LazyTensor)
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


class _LazyTensor:
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


def _lazy_safetensors(path: Path) -> dict[str, _LazyTensor]:
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
            tensors[key] = _LazyTensor(path, dtype, info["shape"], data_start + begin, end - begin)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error, OSError) as exc:
        raise _corrupt(path, _first_line(exc)) from None
    return tensors


def _resolve_weights_path(path: Path | str) -> Path:
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
        as ``module.`` are left for :func:`load_weights`, which strips them only if that makes the
        keys match the model.

    Raises:
        WeightsError: The file is missing, has an unknown extension, is truncated or corrupt,
            holds no tensors, or would need to unpickle Python objects other than tensors.
    """
    return {k: v.load() if isinstance(v, _LazyTensor) else v for k, v in _read_tensors(path).items()}


def _read_tensors(path: Path | str) -> dict[str, Any]:
    """Like :func:`read_state_dict`, but a safetensors file's tensors stay unread (:class:`_LazyTensor`)."""
    path = _resolve_weights_path(path)
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
# Fitting a state dict to a model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain timm model inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def model_name(model: nn.Module) -> str:
    """The timm architecture name, or the class name for models timm doesn't know (for messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the classification head(s), from timm's config and ``get_classifier()``."""
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, str):
        names.append(classifier)
    elif isinstance(classifier, (tuple, list)):
        names.extend(str(c) for c in classifier)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:
            head = None
        if isinstance(head, nn.Module):
            names.extend(name for name, module in model.named_modules() if module is head and name)
    return list(dict.fromkeys(names))


def _is_classifier_key(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def _score(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(keys matching name and shape, keys matching name) — higher is a better fit."""
    by_name = [k for k in state_dict if k in model_sd]
    by_shape = sum(1 for k in by_name if tuple(state_dict[k].shape) == tuple(model_sd[k].shape))
    return by_shape, len(by_name)


def _strip_prefixes(
    state_dict: dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``) if that improves the fit.

    Prefixes stack (DDP around a compiled model gives ``module._orig_mod.``), and an intermediate
    step may match nothing, so every combination up to three deep is scored and the best kept (the
    fewest strips on a tie). Comparing against the model's own keys, rather than stripping blindly,
    keeps models whose real parameter names start with ``model.`` intact.
    """
    best, best_score = state_dict, _score(state_dict, model_sd)
    frontier = [state_dict]
    for _depth in range(3):
        next_frontier = []
        for current in frontier:
            for prefix in _STRIP_PREFIXES:
                if not any(k.startswith(prefix) for k in current):
                    continue
                candidate = {k.removeprefix(prefix): v for k, v in current.items()}
                if len(candidate) != len(current):
                    continue  # stripping would merge two keys: not a wrapper prefix
                next_frontier.append(candidate)
                score = _score(candidate, model_sd)
                if score > best_score:
                    best, best_score = candidate, score
        frontier = next_frontier
    return best


def _timm_filter_fn(model: nn.Module) -> Any:
    """timm's ``checkpoint_filter_fn`` for the model's family, if it has one."""
    arch = model_name(model)
    module_name = None
    with contextlib.suppress(Exception):
        from timm.models._registry import _model_to_module

        module_name = _model_to_module.get(arch)
        if module_name and not module_name.startswith("timm."):
            module_name = f"timm.models.{module_name}"
    module = sys.modules.get(module_name or "") or sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _apply_timm_filter(
    state_dict: dict[str, torch.Tensor], model: nn.Module, model_sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Try timm's converter for original (non-timm) checkpoints; keep it only if it fits better.

    The filters also resample position embeddings for a different ``img_size``. They are written for
    specific source layouts and may raise or mangle other inputs, so any failure falls back to the
    unfiltered weights.
    """
    fn = _timm_filter_fn(model)
    if fn is None:
        return state_dict
    # The filters need real tensors; when they do not help, the unread (lazy) originals are kept, so
    # the full copy made here lives only for the attempt.
    loaded = {k: v.load() if isinstance(v, _LazyTensor) else v for k, v in state_dict.items()}
    try:
        try:
            filtered = fn(dict(loaded), model)
        except TypeError:
            filtered = fn(dict(loaded))
    except Exception:
        return state_dict
    if not isinstance(filtered, Mapping):
        return state_dict
    filtered = {k: v for k, v in filtered.items() if isinstance(v, torch.Tensor)}
    return filtered if _score(filtered, model_sd) > _score(state_dict, model_sd) else state_dict


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def load_weights(model: nn.Module, path: Path | str) -> WeightsReport:
    """Load a local weights file into ``model`` and report what happened.

    A checkpoint trained for another label set is the normal starting point of fine-tuning, so a
    classifier whose shape differs is dropped and the model keeps its fresh head (listed in
    ``reinitialised``). Every other tensor must fit: a mismatch elsewhere means the file belongs to a
    different architecture (or a different ``img_size``/variant), and loading around it would leave
    the model partly random without anyone noticing.

    Args:
        model: A timm model (compiled or DDP-wrapped models are unwrapped).
        path: See :func:`read_state_dict`.

    Returns:
        A :class:`WeightsReport`; ``missing`` excludes the re-initialised head.

    Raises:
        WeightsError: The file cannot be read (see :func:`read_state_dict`), shares no key with the
            model, or has non-classifier tensors whose shapes differ from the model's.
    """
    target = unwrap_model(model)
    state_dict = _read_tensors(path)
    model_sd = target.state_dict()
    name = model_name(target)

    heads = _classifier_prefixes(target)
    state_dict = _strip_prefixes(state_dict, model_sd)
    # timm's converter reads every tensor: try it only when the file would otherwise be refused (a
    # parameter missing or a tensor of another shape outside the head), not for missing buffers such
    # as num_batches_tracked or for extra keys, which load as they are.
    params = {n for n, _ in target.named_parameters()}
    misfit = any(
        (k in params and k not in state_dict)
        or (k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape))
        for k, v in model_sd.items()
        if not _is_classifier_key(k, heads)
    )
    if misfit:
        state_dict = _apply_timm_filter(state_dict, target, model_sd)
    by_name = _score(state_dict, model_sd)[1]

    if by_name == 0:
        sample = ", ".join(list(state_dict)[:5])
        raise WeightsError(
            f"none of the {len(state_dict)} tensors in {path} match {name} (file keys start with: "
            f"{sample}); is it for another architecture? Pass weights for {name}, or the matching --model"
        )

    reinitialised: list[str] = []
    mismatched: list[str] = []
    for key, expected in model_sd.items():  # model order reads naturally (stem first, head last)
        tensor = state_dict.get(key)
        if tensor is None or tuple(expected.shape) == tuple(tensor.shape):
            continue
        if _is_classifier_key(key, heads):
            reinitialised.append(key)
        else:
            mismatched.append(f"{key}: file {_shape(tensor)} vs model {_shape(expected)}")
    if mismatched:
        listed = "\n".join(f"  - {m}" for m in mismatched[:_MAX_LISTED])
        more = f"\n  ... and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else ""
        raise WeightsError(
            f"{len(mismatched)} tensor(s) in {path} have a different shape than in {name}:\n{listed}{more}\n"
            "The file is probably for another architecture or variant (or another img_size/model.kwargs); "
            "pass weights that match --model, or the --model the file was trained with."
        )

    missing_params = [
        n for n, _ in target.named_parameters() if n not in state_dict and not _is_classifier_key(n, heads)
    ]
    if missing_params:
        listed = "\n".join(f"  - {m}" for m in missing_params[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(missing_params) - _MAX_LISTED} more"
            if len(missing_params) > _MAX_LISTED
            else ""
        )
        raise WeightsError(
            f"{len(missing_params)} parameter(s) of {name} are not in {path}:\n{listed}{more}\n"
            "Training would start them from random values. The file is probably for another architecture, "
            "depth or variant (or another model.kwargs); pass weights that match --model, or the --model "
            "the file was trained with."
        )

    for key in reinitialised:
        del state_dict[key]
    unexpected = tuple(k for k in state_dict if k not in model_sd)
    missing = tuple(k for k in model_sd if k not in state_dict and k not in set(reinitialised))
    loaded = sum(1 for k in state_dict if k in model_sd)
    mapped = _MappedFile(_resolve_weights_path(path))  # a .pth file is memory-mapped (torch.load mmap)
    _stream_into(target, {k: v for k, v in state_dict.items() if k in model_sd}, mapped)
    del state_dict
    return WeightsReport(
        path=str(path),
        loaded=loaded,
        missing=missing,
        unexpected=unexpected,
        reinitialised=tuple(reinitialised),
    )


def _stream_into(model: nn.Module, state_dict: dict[str, Any], mapped: _MappedFile | None = None) -> None:
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
            chunk[key] = value.load() if isinstance(value, _LazyTensor) else value
        model.load_state_dict(chunk, strict=False)
        if mapped is not None:
            mapped.release(chunk.values())
        del chunk


class _MappedFile:
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
    _stream_into(model, state_dict, _MappedFile(path))


def copy_off_file(obj: Any, path: Path) -> Any:
    """``obj`` (nested dicts/lists/tuples) with every tensor memory-mapped from ``path`` copied to memory.

    ``optimizer.load_state_dict`` keeps the tensors it is given (momentum buffers) when their dtype and
    device already fit: tensors of a memory-mapped checkpoint would keep the whole file mapped, and the
    replaced checkpoint on disk, for the whole run. Copies one tensor at a time, handing its pages back.
    """
    mapped = _MappedFile(path)

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


# --------------------------------------------------------------------------------------------------
# Building models


def _name_pattern(name: str) -> str:
    stem = re.split(r"[_.\-\d]", name.strip().lower(), maxsplit=1)[0]
    return f"*{stem}*" if stem else "*"


def _unknown_model_error(name: str) -> ModelError:
    arch = name.split(".", 1)[0]
    candidates = timm.list_models()
    suggestions = difflib.get_close_matches(arch.lower(), candidates, n=5, cutoff=0.6)
    if not suggestions:
        suggestions = fnmatch.filter(candidates, _name_pattern(arch))[:5]
    hint = f"`timm.list_models('{_name_pattern(arch)}')` lists names"
    if suggestions:
        return ModelError(f"unknown model {name!r}; did you mean: {', '.join(suggestions)}? ({hint})")
    return ModelError(f"unknown model {name!r} (timm {timm.__version__} has no such architecture); {hint}")


def _no_hub_error(name: str, why: str) -> ModelError:
    return ModelError(
        f"cannot download pretrained weights for {name!r}: {why}. Pass a local weights file instead "
        'with --weights PATH (model.weights = "PATH"): a .safetensors or PyTorch .pth/.bin file '
        "fetched on a machine with internet access"
    )


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds within ``timeout`` seconds.

    Runs in a daemon thread because name resolution ignores socket timeouts; on a black-holed
    network it could otherwise block far longer than the probe is meant to take.
    """
    ok = threading.Event()

    def probe() -> None:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except Exception:  # any failure (DNS, refused, timeout) means "not reachable"
            return
        sock.close()
        ok.set()

    thread = threading.Thread(target=probe, name="ftsgd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return ok.is_set()


def _probe_target(url: str) -> tuple[str, int]:
    """Host and port a download of ``url`` connects to first (the proxy, if one is configured)."""
    scheme = urlparse(url).scheme or "https"
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    parsed = urlparse(proxy if proxy else url)
    default_port = 443 if (parsed.scheme or scheme) == "https" else 80
    return parsed.hostname or "", parsed.port or default_port


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cached_pretrained_file(pcfg: Mapping[str, Any]) -> str | None:
    """Path of already-downloaded pretrained weights in the hub or torch cache, if any."""
    hub_id = pcfg.get("hf_hub_id")
    if hub_id:
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = str(hub_id).partition("@")
            filenames = [pcfg["hf_hub_filename"]] if pcfg.get("hf_hub_filename") else []
            filenames += ["model.safetensors", "pytorch_model.bin"]
            for filename in filenames:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pcfg.get("url")
    if url and not hub_id:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return str(candidate)
    return None


def _pretrained_overlay(name: str) -> dict[str, Any]:
    """Decide how ``pretrained=True`` gets its weights without hanging on an offline machine.

    Returns a ``pretrained_cfg_overlay`` for ``timm.create_model``: ``{"file": cached}`` when the weights
    are already cached (so timm never touches the network), else ``{}`` after checking that the
    download source answers.

    Raises:
        ModelError: timm has no pretrained weights for the model, or they are not cached and the
            source is unreachable (or ``HF_HUB_OFFLINE`` is set).
    """
    if name.startswith("local-dir:"):
        return {}
    if name.startswith("hf-hub:"):
        pcfg: Mapping[str, Any] = {"hf_hub_id": name.removeprefix("hf-hub:")}
    else:
        found = None
        with contextlib.suppress(Exception):
            found = timm.models.get_pretrained_cfg(name)
        pcfg = found.to_dict() if found is not None else {}
        if not (pcfg.get("hf_hub_id") or pcfg.get("url") or pcfg.get("file")):
            raise ModelError(
                f"timm has no pretrained weights for {name!r}; pass a local weights file with "
                "--weights PATH (model.weights), or train from scratch with pretrained = false"
            )
        if pcfg.get("file"):
            return {}
        cached = _cached_pretrained_file(pcfg)
        if cached:
            return {"file": cached}
    if pcfg.get("hf_hub_id"):
        if _env_flag("HF_HUB_OFFLINE"):
            raise _no_hub_error(name, "HF_HUB_OFFLINE is set and the weights are not in the local cache")
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        url = str(pcfg["url"])
    host, port = _probe_target(url)
    if not _reachable(host, port, _PROBE_TIMEOUT_S):
        raise _no_hub_error(name, f"{host}:{port} is unreachable (offline?) and the weights are not cached")
    return {}


def _looks_like_download_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("huggingface_hub", "urllib", "requests", "httpx"))


def build_model(cfg: ModelConfig, num_classes: int | None = None) -> tuple[nn.Module, WeightsReport | None]:
    """Create the timm model a recipe asks for and load its starting weights.

    Args:
        cfg: ``name`` (a timm architecture, optionally with a ``.tag``, or ``local-dir:PATH``),
            ``pretrained`` (timm's hub download), ``weights`` (a local file; takes precedence over
            ``pretrained``, so an offline machine never tries the hub when a file is given) and
            ``kwargs`` for ``timm.create_model``.
        num_classes: Size of the new classifier; ``None`` keeps the architecture's default.

    Returns:
        The model (in train mode, on the CPU) and the :class:`WeightsReport` when ``cfg.weights``
        was loaded, else ``None``.

    Raises:
        ModelError: Unknown model name (with close matches), keyword arguments the architecture
            rejects, or pretrained weights that cannot be downloaded.
        WeightsError: ``cfg.weights`` cannot be read or does not fit the model.
    """
    name = cfg.name.strip()
    if not name:
        raise ModelError("no model given; pass --model NAME (model.name), e.g. --model vit_base_patch16_224")
    is_source = name.startswith(("hf-hub:", "local-dir:"))
    if not is_source and not timm.is_model(name):
        raise _unknown_model_error(name)

    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = bool(cfg.pretrained) and not cfg.weights
    if pretrained:
        overlay = _pretrained_overlay(name)
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay

    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(
            f"timm could not build {name!r} with model.kwargs {dict(cfg.kwargs)!r}: {_first_line(exc)}. "
            "Remove or correct the offending key in the recipe's [model] kwargs"
        ) from exc
    except (ValueError, AssertionError) as exc:
        if not cfg.kwargs:
            raise
        raise ModelError(
            f"timm could not build {name!r} with model.kwargs {dict(cfg.kwargs)!r}: "
            f"{_first_line(exc) if str(exc) else 'invalid value'}. Check the values in [model] kwargs"
        ) from exc
    except RuntimeError as exc:
        text = _first_line(exc)
        if "Unknown model" in text or "Invalid pretrained tag" in text:
            raise ModelError(
                f"{text.rstrip('.')}; `timm.list_pretrained('{name.split('.')[0]}*')` lists the tags"
            ) from exc
        if pretrained and "No pretrained weights" in text:
            raise _no_hub_error(name, text) from exc
        if pretrained and _looks_like_download_error(exc):
            raise _no_hub_error(name, text) from exc
        raise
    except Exception as exc:
        if pretrained and _looks_like_download_error(exc):
            raise _no_hub_error(name, _first_line(exc)) from exc
        raise

    report = load_weights(model, cfg.weights) if cfg.weights else None
    return model, report


def _native_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The spatial size the model was built for, when it differs from its pretrained config's.

    A ViT built with ``img_size=64`` keeps ``pretrained_cfg['input_size'] == (3, 224, 224)``, and
    ``resolve_data_config`` returns that, which would feed it images it cannot take.
    """
    with contextlib.suppress(Exception):
        from timm.models._input import get_model_input_config

        size = tuple(get_model_input_config(model)["input_size"][1:])
        if len(size) == 2:
            return int(size[0]), int(size[1])
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        return int(img_size[0]), int(img_size[1])
    return None


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.

    From ``timm.data.resolve_data_config({}, model=model)``, with ``input_size`` corrected to the
    resolution the model was actually built for (``img_size`` in ``model.kwargs``).
    """
    from timm.data import resolve_data_config

    target = unwrap_model(model)
    config = dict(resolve_data_config({}, model=target))
    size = _native_img_size(target)
    if size is not None:
        config["input_size"] = (config["input_size"][0], *size)
    return config
