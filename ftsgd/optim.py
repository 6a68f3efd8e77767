"""Optimizers and learning-rate schedules.

Only trainable parameters reach the optimizer, so frozen ones get neither gradients nor optimizer
state: that is where freezing the embedding saves memory on top of SGD's smaller state.

The schedule is a pure function of (epoch, step) rather than a stateful scheduler object: resuming a
run mid-epoch, or updating parameters inside backward with one optimizer per parameter, then needs
no scheduler state at all, and the learning rate at any point is easy to test.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftsgd.recipe import OptimConfig, ScheduleConfig

SGD_NAMES = {"sgd": False, "momentum": False, "nesterov": True}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters, split so that biases and norm weights skip weight decay (unless asked).

    timm's ``param_groups_weight_decay`` already leaves out parameters with ``requires_grad=False`` and
    honours the model's own ``no_weight_decay()`` list (position embeddings, tokens).
    """
    if cfg.weight_decay > 0 and not cfg.decay_bias_and_norm:
        from timm.optim import param_groups_weight_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
        return [g for g in groups if g["params"]]
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": cfg.weight_decay}] if params else []


def create_optimizer(params: list[dict] | list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` over ``params`` (groups or a plain list).

    SGD and AdamW are built directly from ``torch.optim`` so that ``momentum = 0`` really keeps no
    state and ``nesterov`` means what it says (timm's ``"sgd"`` turns Nesterov on); every other name
    goes through timm's optimizer factory.
    """
    name = cfg.name.lower()
    if name in SGD_NAMES:
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov or (SGD_NAMES[name] and cfg.momentum > 0),
            weight_decay=cfg.weight_decay,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        params, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def lr_at(
    schedule: ScheduleConfig, base_lr: float, *, epochs: int, steps_per_epoch: int, epoch: int, step: int = 0
) -> float:
    """Learning rate for optimizer step ``step`` of ``epoch`` (both 0-based).

    With ``interval = "epoch"`` the rate changes only between epochs (the paper's cosine stepped per
    epoch, like ``CosineAnnealingLR(T_max=epochs)``); with ``"step"`` it changes every optimizer step.
    Warmup ramps linearly as ``lr * (t + 1) / (warmup + 1)`` so no step ever runs at a rate of zero.
    """
    if schedule.interval == "step":
        scale = max(1, steps_per_epoch)
        t, total, warmup = epoch * scale + step, epochs * scale, round(schedule.warmup_epochs * scale)
    else:
        scale = 1
        t, total, warmup = epoch, epochs, int(schedule.warmup_epochs)
    if t < warmup:
        return base_lr * (t + 1) / (warmup + 1)
    if schedule.name == "cosine":
        return schedule.min_lr + 0.5 * (base_lr - schedule.min_lr) * (1 + math.cos(math.pi * t / total))
    if schedule.name == "step":
        return base_lr * schedule.decay_rate ** ((t // scale) // schedule.decay_epochs)
    return base_lr


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    """Set the learning rate of every parameter group (honouring a timm ``lr_scale`` if present)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
