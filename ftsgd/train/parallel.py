"""How one model trains on several processes: replicated with DDP, or sharded with FSDP2 (``train.shard``).

DDP keeps a whole copy of the model on every process and all-reduces the gradients; only trainable
parameters are in its communication buckets, so a frozen embedding costs no communication. FSDP2
(``torch.distributed.fsdp.fully_shard``) splits every parameter, its gradient and its optimizer state
into one slice per process and gathers one block's weights at a time for its forward and backward: the
memory per GPU for the training state divides by the number of processes.

Checkpoints and exports stay in the one-process format whichever is used (plain ``state_dict`` keys,
optimizer state keyed by parameter index): FSDP's full state is gathered for them. So a run can resume
with a different number of processes, or on one.

BatchNorm running statistics are the one piece of state a process updates from its own images only.
Instead of broadcasting rank 0's (what DDP does by default, dropping every other process's updates),
:func:`merge_running_stats` recombines them after every step into exactly what one process updating
micro-batch after micro-batch in the global order would hold (a cumulative average, ``momentum=None``,
cannot be recombined: :func:`ftsgd.run.checks.check_parallel_model` refuses it before training).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ftsgd.utils.distributed import World, all_reduce_sum

__all__ = [
    "RunningStats",
    "full_model_state",
    "full_optimizer_state",
    "load_model_state",
    "load_optimizer_state",
    "merge_running_stats",
    "no_sync",
    "shard_model",
    "shard_units",
    "snapshot_running_stats",
    "wrap_ddp",
]

RunningStats = list[tuple[_BatchNorm, torch.Tensor, torch.Tensor, torch.Tensor]]
"""BatchNorm layers in training mode with their running mean, variance and batch count before a step."""


def wrap_ddp(model: nn.Module, world: World) -> DistributedDataParallel:
    """``model`` under DDP: gradients of trainable parameters all-reduced during backward.

    ``gradient_as_bucket_view`` makes the gradients views of DDP's communication buckets (no second
    copy of them); buffers are not broadcast from rank 0 at every forward pass, because
    :func:`merge_running_stats` keeps BatchNorm statistics in step on every process instead.
    """
    return DistributedDataParallel(
        model,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        forward_sync_buffers=False,
    )


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for a micro-batch that is not the step's last (gradients accumulate locally)."""
    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def shard_units(model: nn.Module) -> list[str]:
    """The modules FSDP shards as one unit each: the outermost blocks kept in a Sequential/ModuleList.

    A unit is a child of an ``nn.Sequential``/``nn.ModuleList`` that has parameters and children of its
    own: a ViT's ``blocks.N``, a ResNet's ``layerK.N``, a ConvNeXt's ``stages.N``. A stem's plain
    ``Conv2d``/``BatchNorm`` layers are not; they stay with the root unit. One unit's full weights
    exist at a time during forward and backward.
    """
    units: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{u}.") for u in units):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        has_params = next(module.parameters(), None) is not None
        has_children = next(module.children(), None) is not None
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and has_params and has_children:
            units.append(name)
    return units


def shard_model(model: nn.Module, world: World) -> list[str]:
    """Shard ``model`` in place with FSDP2 over all processes: each unit, then the root.

    The model may still be on the CPU: ``fully_shard`` moves one unit at a time to the process's
    device and keeps only its slice, so a model that does not fit one GPU never has to.

    Returns:
        The names of the units (:func:`shard_units`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    units = shard_units(model)
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return units


def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's whole ``state_dict`` (for FSDP gathered on rank 0, ``{}`` elsewhere; a collective)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole ``state_dict`` into an FSDP model; every process keeps its own slice (strict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: Any, sharded: bool) -> dict[str, Any]:
    """The optimizer's state in ``optimizer.state_dict()``'s format (indices), whether sharded or not.

    For FSDP the whole state is gathered on rank 0 (``{}`` elsewhere; a collective) and its keys,
    parameter names, are turned back into indices in parameter-group order, which is what a plain
    optimizer uses: so a checkpoint of a sharded run resumes without FSDP too, and the other way round.
    """
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_state_options())
    if not named:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state` (indices) into the optimizer of an FSDP model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if any(i >= len(order) for i in state["state"]) or len(state["param_groups"]) != len(
        optimizer.param_groups
    ):
        raise ValueError("optimizer state does not match the model's trainable parameters")
    named = {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def snapshot_running_stats(model: nn.Module) -> RunningStats:
    """The running statistics of every BatchNorm layer in training mode, as a step starts."""
    return [
        (m, m.running_mean.detach().clone(), m.running_var.detach().clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None
    ]


def merge_running_stats(before: RunningStats, first: int, count: int, total: int) -> None:
    """Make every process's BatchNorm running statistics those of one process that ran the whole step.

    One process updates ``r <- (1 - a) r + a m_j`` for the micro-batches ``j = 0 .. total-1`` of a step
    in order, i.e. ``r_total = (1-a)^total r_0 + sum_j a (1-a)^(total-1-j) m_j``. This process ran the
    micro-batches ``first .. first+count-1`` starting from ``r_0``, so its share of the sum is
    ``(1-a)^(total-first-count) (r_local - (1-a)^count r_0)``; one all-reduce adds up the shares (in
    float64). A process that ran only blank images (``count = 0``) contributes nothing.

    Args:
        before: :func:`snapshot_running_stats` taken before the step's first forward pass.
        first: Index of this process's first micro-batch in the global batch.
        count: Number of micro-batches this process ran.
        total: Number of micro-batches of the global batch.
    """
    if not before:
        return
    shares = []
    for bn, mean0, var0, _ in before:
        decay = 1.0 - float(bn.momentum)  # type: ignore[arg-type]
        later, own = decay ** (total - first - count), decay**count
        for now, start in ((bn.running_mean, mean0), (bn.running_var, var0)):
            share = (now.double() - own * start.double()) * later
            shares.append(share if count else torch.zeros_like(share))
    summed = all_reduce_sum(torch.cat(shares))
    offset = 0
    with torch.no_grad():
        for bn, mean0, var0, batches0 in before:
            decay = (1.0 - float(bn.momentum)) ** total  # type: ignore[arg-type]
            for now, start in ((bn.running_mean, mean0), (bn.running_var, var0)):
                k = start.numel()
                now.copy_((decay * start.double() + summed[offset : offset + k]).view_as(now))
                offset += k
            bn.num_batches_tracked.copy_(batches0 + total)
