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


def optimizer_names() -> list[str]:
    """Optimizer names accepted by ``optim.name``: ours plus timm's registry."""
    from timm.optim import list_optimizers

    return sorted({"sgd", "adamw", "adam", "momentum", "nesterov", *(n.lower() for n in list_optimizers())})


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


class StepInBackward:
    """Apply each parameter's update inside backward, as soon as its gradient is complete.

    Every trainable parameter gets its own small optimizer (same class and settings as the normal
    path, so the arithmetic matches) and a ``register_post_accumulate_grad_hook`` that steps it and
    frees the gradient at once. No full set of gradients ever exists: with SGD without momentum the
    training state is then little more than the weights themselves.

    It quacks enough like an optimizer for the training loop: ``param_groups`` (for the learning-rate
    schedule), ``zero_grad``, ``state_dict``/``load_state_dict`` (for checkpoints). ``step`` is a
    no-op because the work already happened during backward.
    """

    def __init__(self, groups: list[dict], cfg: OptimConfig) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self._by_param: dict[nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                opt = create_optimizer([{"params": [param], **options}], cfg)
                self.optimizers.append(opt)
                self._by_param[param] = opt
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_param))

    def _step_param(self, param: torch.Tensor) -> None:
        opt = self._by_param[param]  # type: ignore[index]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        """Nothing to do: every parameter was updated during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        per_param = state.get("per_parameter")
        if not isinstance(per_param, list) or len(per_param) != len(self.optimizers):
            raise ValueError("optimizer state does not match: it was not saved with optim.step_in_backward")
        for opt, sd in zip(self.optimizers, per_param, strict=True):
            opt.load_state_dict(sd)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | StepInBackward:
    """The optimizer a recipe asks for: a normal one, or per-parameter updates inside backward."""
    groups = param_groups(model, cfg)
    if cfg.step_in_backward:
        return StepInBackward(groups, cfg)
    return create_optimizer(groups, cfg)
