"""Estimate the memory a fine-tuning run keeps for weights, gradients and optimizer state.

The paper's memory argument (Kumar et al., ICLR 2024) is per parameter: AdamW keeps the weight, its
gradient and two moments (16 bytes in fp32), SGD with momentum 12, SGD without momentum 8; a frozen
parameter costs only its 4 weight bytes. :func:`estimate_memory` applies that accounting to a real
model, a freeze set and an ``[optim]`` section so ``ftsgd inspect`` can show what freezing and the
optimizer choice save before anything is trained.

Activation memory depends on the batch size, the resolution, what is frozen and gradient
checkpointing, so it is measured rather than computed: :func:`measure_activations` runs real
training-mode forward passes under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the
distinct storages autograd keeps for backward (parameters and buffers excluded, views counted once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ftsgd.errors import first_line
from ftsgd.model.optim import SGD_NAMES
from ftsgd.model.rounding import MOMENTUM_DTYPE
from ftsgd.recipe.schema import OptimConfig
from ftsgd.utils.device import autocast

__all__ = [
    "OPTIMIZER_STATE_SLOTS",
    "ActivationMeasurement",
    "MemoryEstimate",
    "ProcessMemory",
    "estimate_memory",
    "format_bytes",
    "job_memory",
    "measure_activations",
    "saved_tensor_bytes",
    "state_comparison",
    "state_slots",
]

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
        activations: Bytes autograd saves for backward in one forward pass at ``batch_size`` and
            ``input_size`` (see :func:`measure_activations`); 0 when not measured. Counted in
            ``total`` and in ``adamw_total``.
        params: Number of parameter elements.
        trainable_params: Number of trainable parameter elements.
        batch_size: Batch size the activations were measured for (0: not measured).
        input_size: ``(C, H, W)`` the activations were measured for (None: not measured).
        ema: The moving average of the weights (``train.ema_decay > 0``): one more copy of every
            parameter and buffer, on the training device; 0 when off. Counted in ``total`` (not in
            ``adamw_total``: the baseline is plain AdamW).
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
    batch_size: int = 0
    input_size: tuple[int, ...] | None = None
    ema: int = 0


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


def estimate_memory(
    model: nn.Module,
    frozen: Iterable[str] | set[str],
    optim: OptimConfig,
    *,
    activations: ActivationMeasurement | None = None,
    ema: bool = False,
) -> MemoryEstimate:
    """Estimate training-state memory for ``model`` with ``frozen`` parameters and optimizer ``optim``.

    Each parameter is counted at its own element size (4 bytes for fp32, 2 for bf16 weights, whose SGD
    momentum is bf16 too, AdamW moments and AdamW baseline float32), so the per-parameter rule of the paper -- 16
    bytes AdamW, 12 SGD with momentum, 8 SGD without, 4 frozen -- holds exactly for an fp32 model
    without buffers.

    Args:
        model: The model; parameters and buffers are only inspected, never moved or copied.
        frozen: Names of frozen parameters (from :func:`ftsgd.freeze.frozen_parameter_names`).
            ``requires_grad`` is not consulted, so the estimate can be made before freezing.
        optim: The ``[optim]`` recipe section: ``name``, ``momentum`` and ``step_in_backward``.
        activations: A :func:`measure_activations` result to include (None: activations are 0).
        ema: Count a moving average of the weights (``train.ema_decay > 0``): one more copy of them.

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
        adamw_total += _ADAMW_SLOTS_TOTAL * _fp32_size(p)
        if name in frozen_set:
            continue
        trainable += p.numel()
        gradients += size
        largest_grad = max(largest_grad, size)
        optimizer_state += slots * _state_size(p, optim) + _compensation(p, optim)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights += buffers
    adamw_total += sum(_fp32_size(b) for b in model.buffers())
    if optim.step_in_backward:
        gradients = largest_grad
    act = activations.bytes if activations is not None else 0
    adamw_total += act
    ema_bytes = weights if ema else 0
    total = weights + gradients + optimizer_state + act + ema_bytes
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        total=total,
        adamw_total=adamw_total,
        ratio=total / adamw_total if adamw_total else 0.0,
        bytes_per_param=total / params if params else 0.0,
        step_in_backward=optim.step_in_backward,
        activations=act,
        params=params,
        trainable_params=trainable,
        batch_size=activations.batch_size if activations is not None else 0,
        input_size=tuple(activations.input_size) if activations is not None else None,
        ema=ema_bytes,
    )


def state_comparison(
    model: nn.Module, estimate: MemoryEstimate, embedding: Iterable[str], fixed: Iterable[str] = ()
) -> dict[str, int]:
    """A LoRA recipe's training state beside SGD freeze-embed's and AdamW's on the same model without adapters.

    Weights, gradients and optimizer state only (activations depend on what trains and are measured by a
    run, ``report``'s peak memory): the paper's per-parameter accounting applied to the backbone's own
    parameters, with SGD momentum 0.9 and the embedding frozen, and with AdamW and nothing frozen.
    """
    heads = tuple(embedding)
    skip = set(fixed)
    base = sgd_fe = adamw = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        size = _fp32_size(p)
        base += size
        adamw += size if name in skip else 4 * size
        under = any(name.replace(".base_layer.", ".").startswith(e + ".") for e in heads)
        sgd_fe += size if under or name in skip else 3 * size
    buffers = sum(_fp32_size(b) for b in model.buffers())
    this = estimate.weights + estimate.gradients + estimate.optimizer_state
    return {"this_recipe": this, "sgd_freeze_embed": sgd_fe + buffers, "adamw": adamw + buffers}


def _fp32_size(t: torch.Tensor) -> int:
    """Bytes of ``t``, counting a bf16 tensor as float32: the AdamW baseline bf16 weights are compared with is
    float32, and so are AdamW's moments beside bf16 weights (:mod:`ftsgd.model.rounding`)."""
    return t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size())


def _state_size(p: torch.Tensor, optim: OptimConfig) -> int:
    """Bytes of one optimizer-state slot of ``p``: float32, except SGD's momentum buffer beside bf16 weights,
    whose dtype depends on the rounding (:data:`ftsgd.model.rounding.MOMENTUM_DTYPE`)."""
    if p.dtype == torch.bfloat16 and optim.name.lower() in SGD_NAMES:
        return p.numel() * MOMENTUM_DTYPE[optim.update_rounding].itemsize
    return _fp32_size(p)


def _compensation(p: torch.Tensor, optim: OptimConfig) -> int:
    """The Kahan compensation buffer of a bf16 weight (``optim.update_rounding = "kahan"``), in bf16."""
    low = p.dtype == torch.bfloat16 and optim.update_rounding == "kahan"
    return p.numel() * p.element_size() if low else 0


@dataclass(frozen=True)
class ActivationMeasurement:
    """What :func:`measure_activations` found.

    Attributes:
        bytes: Bytes of the distinct storages autograd keeps for backward at ``batch_size``.
        batch_size: The batch size the figure is for.
        input_size: ``(C, H, W)`` of the images.
        method: How it was obtained: measured at ``batch_size`` directly, or measured at two small
            batches and extrapolated linearly (saved tensors are per-sample or batch-independent).
        tensors: Distinct storages saved in the (last) measured pass.
    """

    bytes: int
    batch_size: int
    input_size: tuple[int, ...]
    method: str
    tensors: int


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_tensor_bytes(
    model: nn.Module, x: torch.Tensor, *, amp_dtype: torch.dtype | None = None
) -> tuple[int, int]:
    """Bytes and number of the distinct storages autograd saves for backward during ``model(x)``.

    Every tensor saved for backward passes through a ``saved_tensors_hooks`` pack hook; tensors are
    grouped by storage, so views of one storage (a transposed weight, a reshaped activation) count
    once, at the storage's full size. Storages of the model's parameters and buffers are not
    activations and are left out. Tensors kept by non-reentrant gradient checkpointing are seen too
    (it saves each checkpointed block's inputs through ``save_for_backward``), the recomputed
    activations inside a block are not: they only exist during that block's backward.
    """
    exclude = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t  # keeping the tensor keeps its address unique until the pass is over

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x.device, amp_dtype):
        out = model(x)
    del out
    return sum(seen.values()), len(seen)


@contextlib.contextmanager
def _probe_state(model: nn.Module, frozen: set[str], grad_checkpointing: bool) -> Iterator[None]:
    """Training mode with ``frozen`` frozen (and checkpointing on); everything restored afterwards.

    BatchNorm running statistics, ``requires_grad`` flags, module modes and the global RNGs come
    back exactly as they were, so a probe never changes the model it measured.
    """
    from ftsgd.model.freeze import train_mode

    modes = {m: m.training for m in model.modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    checkpointing = bool(getattr(model, "grad_checkpointing", False))
    try:
        with torch.random.fork_rng(devices=[]):
            for name, p in model.named_parameters():
                if name in frozen:
                    p.requires_grad_(False)
            train_mode(model)
            if grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(True)
            yield
    finally:
        if grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(checkpointing)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for m, mode in modes.items():
            m.training = mode


def measure_activations(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int,
    *,
    frozen: Iterable[str] = (),
    grad_checkpointing: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> ActivationMeasurement:
    """Measure the activation memory of one training step at ``batch_size`` on real forward passes.

    The passes run where the model's parameters are, in training mode (frozen BatchNorm layers in
    eval, as in training), with ``frozen`` parameters not requiring gradients (their layers then save
    less), with gradient checkpointing if asked and under autocast to ``amp_dtype`` if given, on
    random images of ``input_size``. See :func:`saved_tensor_bytes` for what is counted.

    Batches of up to 2 are measured directly. Larger ones are measured at batch 1 and 2 and
    extrapolated linearly (every saved tensor is either per-sample or independent of the batch, so
    this is exact for the models timm ships, and it keeps ``ftsgd inspect`` fast and small for
    ViT-L at batch 32 on a CPU). If batch 1 fails (a BatchNorm over a single value), 2 and 4 are used.

    Raises:
        RuntimeError: The forward pass fails at this input size (e.g. a ViT built for another
            ``img_size``); the message names the size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    size = tuple(int(v) for v in input_size)

    def at(batch: int) -> tuple[int, int]:
        x = torch.randn((batch, *size), device=device, dtype=dtype)
        try:
            return saved_tensor_bytes(model, x, amp_dtype=amp_dtype)
        except Exception as exc:
            raise RuntimeError(
                f"a training-mode forward pass on a {batch}x{'x'.join(map(str, size))} batch failed: {first_line(exc)}"
            ) from exc

    with _probe_state(model, set(frozen), grad_checkpointing):
        if batch_size <= 2:
            total, count = at(batch_size)
            return ActivationMeasurement(total, batch_size, size, f"measured at batch {batch_size}", count)
        try:
            lo, hi = 1, 2
            a, _ = at(lo)
        except RuntimeError:
            lo, hi = 2, 4
            a, _ = at(lo)
        b, count = at(hi)
    per_sample = (b - a) / (hi - lo)
    total = round(a + per_sample * (batch_size - lo))
    method = f"measured at batch {lo} and {hi}, extrapolated linearly to {batch_size}"
    return ActivationMeasurement(max(total, 0), batch_size, size, method, count)


@dataclass(frozen=True)
class ProcessMemory:
    """Memory one GPU (one process) of a ``torchrun`` job keeps, by kind, for DDP or FSDP.

    Attributes:
        weights: Parameters and buffers: all of them with DDP; with FSDP this process's slice of the
            parameters (1/N) plus every buffer (BatchNorm statistics are not sharded).
        gradients: Gradients of trainable parameters (DDP: in its communication buckets; FSDP: 1/N).
        optimizer_state: Optimizer buffers (DDP: all; FSDP: 1/N).
        activations: Saved activations of one forward pass of ``micro_batch`` images on this GPU.
        gathered: FSDP only: full weights gathered while blocks run (the parameters outside any block,
            which stay gathered through forward and backward, plus two blocks' weights, the running one
            and the prefetched next, plus one block's full gradient before it is reduce-scattered).
        total: The sum.
    """

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    gathered: int
    total: int


def job_memory(
    model: nn.Module, estimate: MemoryEstimate, nproc: int, *, units: list[str], activations: int
) -> dict[str, ProcessMemory]:
    """The memory per GPU of a job of ``nproc`` processes, replicated (``"ddp"``) and sharded (``"fsdp"``).

    Args:
        model: The model as trained (frozen parameters with ``requires_grad=False``).
        estimate: :func:`estimate_memory` of the same model and recipe (one process).
        nproc: Number of processes (GPUs).
        units: The blocks FSDP shards one at a time (:func:`ftsgd.parallel.shard_units`).
        activations: Bytes of one forward pass at the per-GPU micro-batch.
    """
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    params = estimate.weights - buffers
    ddp = (estimate.weights, estimate.gradients, estimate.optimizer_state, activations, 0)
    block_weights, block_grads, in_blocks = 0, 0, 0
    for name in units:
        ps = list(model.get_submodule(name).parameters())
        size = sum(p.numel() * p.element_size() for p in ps)
        in_blocks += size
        block_weights = max(block_weights, size)
        block_grads = max(block_grads, sum(p.numel() * p.element_size() for p in ps if p.requires_grad))
    gathered = (params - in_blocks) + 2 * block_weights + block_grads
    share = (
        -(-params // nproc) + buffers,
        -(-estimate.gradients // nproc),
        -(-estimate.optimizer_state // nproc),
    )
    fsdp = (*share, activations, gathered)
    return {name: ProcessMemory(*parts, total=sum(parts)) for name, parts in (("ddp", ddp), ("fsdp", fsdp))}


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
