"""The precision a run computes in: chosen once, when the run starts, and kept for the whole run.

``train.amp = "auto"`` stands for the device's measured default (fp32; see
:func:`ftsgd.utils.device.resolve_amp`), and that default may change between ftsgd versions. A run must not
change precision half-way (the epochs before and after would not be one experiment), so the checkpoint
records the *resolved* precision (``"amp"``: ``none``, ``bf16`` or ``fp16``) and ``--resume`` continues in
it, whatever ``auto`` means now. Evaluation during training and ``ftsgd eval`` compute in it too (the export
records it), so the selected epoch's numbers repeat exactly.

A checkpoint written before precision was recorded has no ``"amp"``. The rule for those (:func:`started_amp`):
an explicit ``train.amp`` (``none``/``bf16``/``fp16``) is what the run used; ``auto`` is resolved as it was
then (:func:`ftsgd.utils.device.legacy_auto_amp`: bf16 on a CUDA GPU with bf16 or a CPU with bf16 hardware,
fp16 on other GPUs, else fp32), and a non-empty gradient-scaler state proves fp16. A warning names the
precision taken. This assumes the run is resumed on the kind of machine it started on, as resuming did before.
"""

from __future__ import annotations

from typing import Any

import torch

from ftsgd.errors import UsageError
from ftsgd.utils.console import warn
from ftsgd.utils.device import AMP_DTYPES, amp_dtype, amp_name, legacy_auto_amp, resolve_amp

__all__ = ["CHECKPOINT_KEY", "precision_words", "started_amp"]

CHECKPOINT_KEY = "amp"
"""Where ``checkpoint.pt`` records the resolved precision (as ``summary.json`` and the export name it)."""


def precision_words(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16 autocast"`` or ``"fp16 autocast"``: a precision as messages name it."""
    return f"{amp_name(dtype)} autocast" if dtype is not None else "fp32"


def started_amp(ckpt: dict[str, Any], mode: str, device: torch.device, path: Any) -> torch.dtype | None:
    """The autocast dtype a resumed run continues in: the one it started with.

    Args:
        ckpt: The checkpoint being resumed (read, not modified).
        mode: The run's ``train.amp`` (from its own ``recipe.toml``).
        device: Where it resumes.
        path: The checkpoint's path, for messages.

    Raises:
        UsageError: the run started in fp16 autocast, which only a CUDA GPU computes, and resumes elsewhere.
    """
    now = resolve_amp(mode, device)
    recorded = ckpt.get(CHECKPOINT_KEY)
    if recorded in AMP_DTYPES:
        dtype = amp_dtype(recorded)
    else:
        dtype = _legacy_amp(ckpt, mode, device)
        warn(
            f"{path} records no precision (written by an older ftsgd): continuing in {precision_words(dtype)}, "
            f'what train.amp = "{mode}" meant when the run started'
            + ("" if dtype == now else f" (a new run now computes in {precision_words(now)})")
        )
        return _usable(dtype, device, path)
    if dtype != now:
        warn(
            f"resuming in {precision_words(dtype)}, the precision this run started with "
            f'(train.amp = "{mode}" now means {precision_words(now)} here; start a new --out to change it)'
        )
    return _usable(dtype, device, path)


def _legacy_amp(ckpt: dict[str, Any], mode: str, device: torch.device) -> torch.dtype | None:
    """The precision a checkpoint without a record was most likely written in (module docstring)."""
    if ckpt.get("scaler"):  # only fp16 autocast keeps a gradient scaler's state
        return torch.float16
    if mode == "auto":
        return legacy_auto_amp(device)
    return resolve_amp(mode, device)


def _usable(dtype: torch.dtype | None, device: torch.device, path: Any) -> torch.dtype | None:
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError(
            f"{path}: the run started in fp16 autocast, which needs a CUDA GPU; resume it on one "
            '(train.device = "cuda"), or start a new run'
        )
    return dtype
