"""Estimate the memory a fine-tuning run keeps for weights, gradients and optimizer state.

The paper's memory argument (Kumar et al., ICLR 2024) is per parameter: AdamW keeps the weight, its
gradient and two moments (16 bytes in fp32), SGD with momentum 12, SGD without momentum 8; a frozen
parameter costs only its 4 weight bytes. :func:`estimate_memory` applies that accounting to a real
model, a freeze set and an ``[optim]`` section so ``ftsgd inspect`` can show what freezing and the
optimizer choice save before anything is trained.

Activation memory (which depends on batch size, resolution and checkpointing) is not estimated yet;
:class:`MemoryEstimate` has an ``activations`` field, 0 for now and already part of ``total``, so it
can be filled in without changing callers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ftsgd.recipe import OptimConfig

__all__ = ["OPTIMIZER_STATE_SLOTS", "MemoryEstimate", "estimate_memory", "format_bytes", "state_slots"]

#: Optimizer state per trainable parameter, in units of that parameter's size (1 slot = 4 bytes in
#: fp32), for the names timm's ``create_optimizer_v2`` accepts. Momentum-style optimizers listed in
#: :data:`_MOMENTUM_SLOT` add one slot only when ``momentum > 0``. Values come from each optimizer's
#: ``state`` tensors of parameter shape; per-tensor scalars (step counters, NovoGrad's per-layer
#: norms) are ignored. Adafactor stores factored row/column second moments, about (rows + cols) per
#: matrix rather than rows * cols, so it is counted as 0 -- a slight underestimate.
OPTIMIZER_STATE_SLOTS: dict[str, int] = {
    # SGD family: the momentum buffer only (see _MOMENTUM_SLOT).
    "sgd": 0,
    "nesterov": 0,
    "momentum": 0,
    "sgdw": 0,
    "sgdp": 0,
    "lars": 0,
    "larc": 0,
    "nlars": 0,
    "nlarc": 0,
    # Adam family: exp_avg + exp_avg_sq.
    "adam": 2,
    "adamw": 2,
    "nadam": 2,
    "nadamw": 2,
    "radam": 2,
    "adamp": 2,
    "adabelief": 2,
    "radabelief": 2,
    "lamb": 2,
    "lambc": 2,
    "adopt": 2,
    "adoptw": 2,
    "laprop": 2,
    "adamax": 2,  # exp_avg + exp_inf
    "adadelta": 2,  # square_avg + acc_delta
    "adahessian": 2,
    "mars": 3,  # exp_avg + exp_avg_sq + last_grad
    "adan": 4,  # exp_avg + exp_avg_sq + exp_avg_diff + previous gradient
    "madgrad": 3,  # grad_sum_sq + s + x0
    "madgradw": 3,
    # One buffer.
    "lion": 1,  # exp_avg
    "adagrad": 1,  # sum
    "novograd": 1,  # exp_avg (+ a per-layer scalar)
    "nvnovograd": 1,
    "rmsprop": 1,  # square_avg (+ momentum buffer, see _MOMENTUM_SLOT)
    "rmsproptf": 1,
    "adafactor": 0,
    "adafactorbv": 0,
}

#: Optimizers whose ``momentum`` argument adds a momentum buffer of parameter size.
_MOMENTUM_SLOT = frozenset(
    {"sgd", "nesterov", "momentum", "sgdw", "sgdp", "lars", "larc", "nlars", "nlarc", "rmsprop", "rmsproptf"}
)

#: Unknown optimizers are assumed to be Adam-like: the common case, and an overestimate is safer
#: than an underestimate when planning memory.
_UNKNOWN_SLOTS = 2

#: AdamW with every parameter trainable: weight + gradient + two moments, the paper's baseline.
_ADAMW_SLOTS_TOTAL = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run keeps resident, by kind.

    Attributes:
        weights: All parameters and buffers (BatchNorm running stats), at their real dtype.
        gradients: Gradients of trainable parameters; with ``step_in_backward`` only the largest
            one, because each gradient is applied and freed as soon as it is ready.
        optimizer_state: Per-parameter optimizer buffers of trainable parameters (see
            :data:`OPTIMIZER_STATE_SLOTS`).
        total: Sum of all terms, ``activations`` included.
        adamw_total: The same model fully trainable with AdamW (16 bytes/parameter in fp32, plus
            buffers): the paper's baseline.
        ratio: ``total / adamw_total``.
        bytes_per_param: ``total`` divided by the number of parameters (buffers make it slightly
            more than the per-parameter rule of thumb).
        step_in_backward: Whether the estimate assumes updates applied during backward.
        activations: Activation memory; not estimated yet (0), already counted in ``total``.
        params: Number of parameter elements.
        trainable_params: Number of trainable parameter elements.
    """

    weights: int
    gradients: int
    optimizer_state: int
    total: int
    adamw_total: int
    ratio: float
    bytes_per_param: float
    step_in_backward: bool
    activations: int = 0
    params: int = 0
    trainable_params: int = 0


def state_slots(optim: OptimConfig) -> int:
    """Parameter-sized optimizer buffers per trainable parameter for ``optim``.

    timm's ``lookahead_`` prefix adds one slot (the slow weights); other prefixes (``fused``) and
    case are ignored.
    """
    name = optim.name.lower().replace("-", "_")
    extra = 0
    if name.startswith("lookahead_"):
        extra, name = 1, name[len("lookahead_") :]
    if name.startswith("fused"):
        name = name[len("fused") :]
    slots = OPTIMIZER_STATE_SLOTS.get(name, _UNKNOWN_SLOTS)
    if name in _MOMENTUM_SLOT and optim.momentum > 0:
        slots += 1
    return slots + extra


def estimate_memory(model: nn.Module, frozen: Iterable[str] | set[str], optim: OptimConfig) -> MemoryEstimate:
    """Estimate training-state memory for ``model`` with ``frozen`` parameters and optimizer ``optim``.

    Each parameter is counted at its own element size (4 bytes for fp32), so the per-parameter
    rule of the paper -- 16 bytes AdamW, 12 SGD with momentum, 8 SGD without, 4 frozen -- holds
    exactly for an fp32 model without buffers.

    Args:
        model: The model; parameters and buffers are only inspected, never moved or copied.
        frozen: Names of frozen parameters (from :func:`ftsgd.freeze.frozen_parameter_names`).
            ``requires_grad`` is not consulted, so the estimate can be made before freezing.
        optim: The ``[optim]`` recipe section: ``name``, ``momentum`` and ``step_in_backward``.

    Returns:
        The :class:`MemoryEstimate`.
    """
    frozen_set = set(frozen)
    slots = state_slots(optim)
    weights = gradients = optimizer_state = adamw_total = 0
    largest_grad = 0
    params = trainable = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        weights += size
        params += p.numel()
        adamw_total += _ADAMW_SLOTS_TOTAL * size
        if name in frozen_set:
            continue
        trainable += p.numel()
        gradients += size
        largest_grad = max(largest_grad, size)
        optimizer_state += slots * size
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights += buffers
    adamw_total += buffers
    if optim.step_in_backward:
        gradients = largest_grad
    activations = 0
    total = weights + gradients + optimizer_state + activations
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        total=total,
        adamw_total=adamw_total,
        ratio=total / adamw_total if adamw_total else 0.0,
        bytes_per_param=total / params if params else 0.0,
        step_in_backward=optim.step_in_backward,
        activations=activations,
        params=params,
        trainable_params=trainable,
    )


_UNITS = (("TiB", 2**40, 2), ("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1))


def format_bytes(n: int) -> str:
    """Human-readable binary size: ``"1.83 GiB"``, ``"512.0 MiB"``, ``"12.3 KiB"``, ``"10 B"``.

    GiB and TiB get two decimals (model sizes differ in the second), MiB and KiB one. A value that
    would round up to 1024 of a unit is shown in the next unit instead (``"1.00 GiB"``, not
    ``"1024.0 MiB"``).
    """
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    for i, (unit, scale, digits) in enumerate(_UNITS):
        below = _UNITS[i + 1] if i + 1 < len(_UNITS) else None
        if n >= scale or (below is not None and round(n / below[1], below[2]) >= 1024):
            return f"{sign}{n / scale:.{digits}f} {unit}"
    return f"{sign}{n} B"
