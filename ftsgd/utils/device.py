"""Where and in what precision the model runs: devices, AMP, RNG state and peak-memory probes.

Kept in one small module so that training, evaluation and the memory measurement of ``ftsgd inspect``
resolve ``train.device``/``train.amp`` and enter autocast the same way: a number measured by
``inspect`` is only useful if it was measured under the precision training will use.
"""

from __future__ import annotations

import contextlib
import functools
import random
import resource
from pathlib import Path
from typing import Any

import torch

from ftsgd.errors import UsageError

__all__ = [
    "AMP_DTYPES",
    "amp_dtype",
    "amp_name",
    "autocast",
    "cpu_has_native_bf16",
    "get_rng_state",
    "legacy_auto_amp",
    "peak_memory_bytes",
    "reset_peak_memory",
    "resolve_amp",
    "resolve_device",
    "set_rng_state",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is a usage error."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError('train.device = "cuda" but no CUDA device is available; use "auto" or "cpu"')
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device, weight_dtype: str = "fp32") -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` (and ``train.weight_dtype``).

    bf16 weights always compute under bf16 autocast, on any device (the recipe's checks refuse them with
    ``"fp16"`` and ``"none"``); otherwise:

    ``auto`` is each device's *measured* default, and that is fp32 on every device: on a CPU, bf16 autocast
    changed what SGD freeze-embed learns on a held-out task (its OOD accuracy and the learning rate selection
    moved beyond the seed spread; ``demo --compare`` is too small to show it: docs/precision.md), and on
    CUDA parity has not been measured yet (``benchmarks/gpu_check.sh`` measures it). ``bf16`` is honoured on any device, opted into;
    ``fp16`` is for CUDA only (validation refuses it with ``train.device = "cpu"``; on a machine without
    CUDA under ``train.device = "auto"`` it means fp32).
    """
    if weight_dtype == "bf16":
        return torch.bfloat16
    if mode in ("none", "auto"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def legacy_auto_amp(device: torch.device) -> torch.dtype | None:
    """What ``train.amp = "auto"`` meant before it became fp32 everywhere (before checkpoints recorded the precision).

    CUDA: bf16 where supported, else fp16; a CPU: bf16 when it computes bf16 in hardware. Only for
    resuming a run whose checkpoint predates recorded precision (:mod:`ftsgd.train.precision`).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def amp_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype a resolved precision name stands for (:func:`amp_name`'s inverse)."""
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[name]


AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Resolved precisions as checkpoints, exports and ``summary.json`` record them (``none``: fp32)."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware: x86 AVX512-BF16 or AMX, or Arm's BF16 extension.

    Read from ``/proc/cpuinfo`` (Linux); elsewhere False. CPUs that only emulate bf16 (AVX-512 without
    BF16, AVX2) run autocast slower than fp32. No default depends on it any more (``auto`` is fp32): it
    tells ``bf16``'s speed apart in messages and benchmarks, and how a checkpoint that predates recorded precision started.
    """
    try:
        return native_bf16_in(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists a hardware bf16 flag (see :func:`cpu_has_native_bf16`)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``-style name of an autocast dtype as recipes spell it (``"none"`` without autocast)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none") if dtype else "none"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """The one autocast context every forward pass uses: ``dtype`` on ``device``, or nothing at all.

    Without a dtype no autocast context is entered, so fp32 runs never depend on autocast's rules.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def get_rng_state() -> dict[str, Any]:
    """The global RNG states a resumed run must restore (torch CPU, Python, and CUDA when present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last :func:`reset_peak_memory`: CUDA max allocated; CPU peak resident set size.

    On Linux the CPU figure is ``VmHWM`` (the resettable high-water mark); elsewhere, or if
    ``/proc`` is unreadable, the process-lifetime ``ru_maxrss``.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (called after each epoch so each record is that epoch's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
