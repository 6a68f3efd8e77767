"""Optimizers and learning-rate schedules.

Only trainable parameters reach the optimizer, so frozen ones get neither gradients nor optimizer
state: that is where freezing the embedding saves memory on top of SGD's smaller state.

Per-layer learning rates (layer-wise decay, embedding and classifier multipliers) are a ``lr_scale``
on each parameter group, which the schedule multiplies in; groups are split by weight decay first,
as timm does, and by multiplier second.

The schedule is a pure function of (epoch, step) rather than a stateful scheduler object: resuming a
run mid-epoch, or updating parameters inside backward with one optimizer per parameter, then needs
no scheduler state at all, and the learning rate at any point is easy to test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ftsgd.errors import RecipeError
from ftsgd.model.layers import layer_groups, layer_map, under_any
from ftsgd.model.rounding import RoundedAdamW, RoundedSGD, RoundingStream
from ftsgd.recipe.schema import OptimConfig, ScheduleConfig

SGD_NAMES = {"sgd": False, "momentum": False, "nesterov": True}


@dataclass(frozen=True)
class LayerLR:
    """The learning-rate multipliers of one layer group, as ``ftsgd inspect`` shows them.

    Attributes:
        name: Layer group label (:func:`ftsgd.layers.layer_groups`), e.g. ``"blocks.3"``.
        kind: ``"embedding"``, ``"middle"`` or ``"head"``.
        params: Parameter elements in the group.
        trainable_params: How many of those the optimizer updates.
        lr_scales: The distinct multipliers of ``optim.lr`` in the group, ascending; empty when the
            whole group is frozen. One value unless a model without ``group_matcher`` spreads timm's
            fallback layers across one top-level child.
    """

    name: str
    kind: str
    params: int
    trainable_params: int
    lr_scales: tuple[float, ...]


def layer_decay_on(cfg: OptimConfig) -> bool:
    """Whether ``optim.layer_decay`` changes anything (0 and 1 both mean off)."""
    return 0 < cfg.layer_decay < 1


def layer_decay_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise LR decay multiplier of every trainable parameter, counting only trained layers.

    The layers are timm's (:func:`ftsgd.layers.layer_map`, what ``param_groups_layer_decay`` uses)
    and the top trained layer gets 1, the one below ``decay``, then ``decay**2``... timm itself counts
    every layer, frozen or not (timm issue 2691): a frozen top layer (an EMA copy, a frozen head)
    would leave no trainable layer at 1, and a frozen layer in between would cost the layers below
    it one more factor although it is never updated. Here layer ids are ranked over the layers that
    hold a trainable parameter only. A frozen embedding at the bottom changes nothing either way:
    the scale depends on the distance from the top.
    """
    ids = layer_map(model)
    top = max(ids.values(), default=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    used = sorted({ids.get(n, top) for n in trainable})
    rank = {lid: i for i, lid in enumerate(used)}
    last = len(used) - 1
    return {n: decay ** (last - rank[ids.get(n, top)]) for n in trainable}


def _check_scaled_part(
    key: str, scale: float, modules: Sequence[str], what: str, trainable: list[str]
) -> None:
    """A scale on the embedding/head needs that part known and at least partly trainable."""
    if scale == 1.0:
        return
    if not modules:
        raise ValueError(f"{key} = {scale} needs the {what}'s module names; pass them to param_groups")
    if not any(under_any(n, modules) for n in trainable):
        raise RecipeError(
            f"{key}: {scale} scales the learning rate of the {what} ({', '.join(modules)}), but all of "
            "its parameters are frozen (freeze.policy or freeze.patterns), so it would do nothing; set "
            f"{key} = 1 or keep the {what} trainable"
        )


def lr_scales(
    model: nn.Module, cfg: OptimConfig, embedding: Sequence[str] = (), classifier: Sequence[str] = ()
) -> dict[str, float]:
    """Learning-rate multiplier of every trainable parameter: layer decay x embed/head scale.

    Args:
        model: The model, with frozen parameters already set to ``requires_grad=False``.
        cfg: ``optim.layer_decay``, ``optim.embed_lr_scale`` and ``optim.head_lr_scale`` are used.
        embedding: Module names of the embedding (``Embedding.modules``); needed when
            ``embed_lr_scale != 1``.
        classifier: Module names of the classifier; needed when ``head_lr_scale != 1``.

    Raises:
        RecipeError: A scale is set on an embedding or classifier whose parameters are all frozen.
        ValueError: A scale is set but the module names were not passed (a caller bug).
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _check_scaled_part("optim.embed_lr_scale", cfg.embed_lr_scale, embedding, "embedding", trainable)
    _check_scaled_part("optim.head_lr_scale", cfg.head_lr_scale, classifier, "classifier", trainable)
    scales = dict.fromkeys(trainable, 1.0)
    if layer_decay_on(cfg):
        scales.update(layer_decay_scales(model, cfg.layer_decay))
    for name in trainable:
        if under_any(name, embedding):
            scales[name] *= cfg.embed_lr_scale
        if under_any(name, classifier):
            scales[name] *= cfg.head_lr_scale
    return scales


def optimizer_names() -> list[str]:
    """Optimizer names accepted by ``optim.name``: ours plus timm's registry."""
    from timm.optim import list_optimizers

    return sorted({"sgd", "adamw", "adam", "momentum", "nesterov", *(n.lower() for n in list_optimizers())})


def _weight_decay_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by weight decay (biases/norms skip it unless asked).

    timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay`` already leave out parameters
    with ``requires_grad=False`` and honour the model's own ``no_weight_decay()`` list (position
    embeddings, tokens). With layer decay, timm's groups are also split per layer; the ``lr_scale``
    timm puts on them is replaced by :func:`lr_scales` (see :func:`layer_decay_scales`).
    """
    skip_1d = cfg.weight_decay > 0 and not cfg.decay_bias_and_norm
    skip = model.no_weight_decay() if skip_1d and hasattr(model, "no_weight_decay") else ()
    if layer_decay_on(cfg):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            model,
            weight_decay=cfg.weight_decay,
            no_weight_decay_list=skip,
            weight_decay_exclude_1d=skip_1d,
            layer_decay=cfg.layer_decay,
        )
        return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if g["params"]]
    if skip_1d:
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
        return [g for g in groups if g["params"]]
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": cfg.weight_decay}] if params else []


def param_groups(
    model: nn.Module, cfg: OptimConfig, *, embedding: Sequence[str] = (), classifier: Sequence[str] = ()
) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning-rate multiplier.

    Frozen parameters are in no group. A group whose multiplier is not 1 carries ``lr_scale`` (which
    :func:`set_lr` honours, also for :class:`StepInBackward`'s per-parameter optimizers) and its
    starting ``lr``. With every multiplier at 1 the groups are exactly the weight-decay groups, so
    optimizer checkpoints of earlier versions still load.

    Args:
        model: The model, frozen parameters already ``requires_grad=False``.
        cfg: The ``[optim]`` recipe section.
        embedding: Module names of the embedding, for ``optim.embed_lr_scale``.
        classifier: Module names of the classifier, for ``optim.head_lr_scale``.
    """
    scales = lr_scales(model, cfg, embedding, classifier)
    names = {id(p): n for n, p in model.named_parameters()}
    out: list[dict] = []
    for base in _weight_decay_groups(model, cfg):
        by_scale: dict[float, list[nn.Parameter]] = {}
        for param in base["params"]:
            by_scale.setdefault(scales[names[id(param)]], []).append(param)
        for scale, params in by_scale.items():
            group = {"params": params, "weight_decay": base["weight_decay"]}
            if scale != 1.0:
                group |= {"lr_scale": scale, "lr": cfg.lr * scale}
            out.append(group)
    return out


def lr_per_layer(
    model: nn.Module, cfg: OptimConfig, embedding: Sequence[str] = (), classifier: Sequence[str] = ()
) -> list[LayerLR]:
    """The multipliers of ``optim.lr`` per layer group, embedding first and head last, for display."""
    scales = lr_scales(model, cfg, embedding, classifier)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    rows = []
    for group in layer_groups(model, embedding, classifier):
        trained = [n for n in group.parameters if n in scales]
        rows.append(
            LayerLR(
                name=group.name,
                kind=group.kind,
                params=sum(sizes[n] for n in group.parameters),
                trainable_params=sum(sizes[n] for n in trained),
                lr_scales=tuple(sorted({scales[n] for n in trained})),
            )
        )
    return rows


def create_optimizer(
    params: list[dict] | list[nn.Parameter], cfg: OptimConfig, stream: RoundingStream | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` over ``params`` (groups or a plain list).

    SGD and AdamW are built directly from ``torch.optim`` so that ``momentum = 0`` really keeps no
    state and ``nesterov`` means what it says (timm's ``"sgd"`` turns Nesterov on); every other name
    goes through timm's optimizer factory. With a ``stream`` (bf16 weights, ``train.weight_dtype``) the
    update is :mod:`ftsgd.model.rounding`'s, rounded as ``optim.update_rounding`` says.
    """
    name = cfg.name.lower()
    if stream is not None:
        return rounded_optimizer(params, cfg, stream)
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
    from timm.optim import create_optimizer_v2, get_optimizer_class

    try:  # timm asserts CUDA and imports optional packages (bitsandbytes, apex) here
        get_optimizer_class(name)
    except (AssertionError, ImportError) as exc:
        raise RecipeError(
            f"optim.name: timm cannot create the {name!r} optimizer here: {exc or type(exc).__name__}"
        ) from None
    return create_optimizer_v2(
        params,
        opt=name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        **changed_moment_args(cfg),
    )


def rounded_optimizer(
    params: list[dict] | list[nn.Parameter], cfg: OptimConfig, stream: RoundingStream
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam/AdamW for bf16 weights: updates computed in float32 and rounded back
    with ``optim.update_rounding``. Other names are refused by the recipe's checks before this."""
    name, mode = cfg.name.lower(), cfg.update_rounding
    if name in SGD_NAMES:
        nesterov = cfg.nesterov or (SGD_NAMES[name] and cfg.momentum > 0)
        return RoundedSGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay,
            rounding=mode, stream=stream,
        )  # fmt: skip
    if name in ("adamw", "adam"):
        return RoundedAdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
            decoupled=name == "adamw", rounding=mode, stream=stream,
        )  # fmt: skip
    raise ValueError(f"no rounded update for optimizer {cfg.name!r} (the recipe's checks refuse it)")


def changed_moment_args(cfg: OptimConfig) -> dict[str, object]:
    """``optim.betas``/``optim.eps`` for a timm optimizer: only the ones changed from the keys' defaults.

    timm passes them to the optimizer class (and drops them for a class without them, which
    :func:`moment_arg_problems` refuses at recipe time). Left at their defaults they are not passed, so
    each optimizer keeps its own: Lion's betas are (0.9, 0.99), Adan's three betas (0.98, 0.92, 0.99),
    LAMB's eps 1e-6. Adam and AdamW are built from torch with the keys as they are.
    """
    defaults = OptimConfig()
    out: dict[str, object] = {}
    if list(cfg.betas) != list(defaults.betas):
        out["betas"] = tuple(cfg.betas)
    if cfg.eps != defaults.eps:
        out["eps"] = cfg.eps
    return out


def moment_arg_problems(cfg: OptimConfig) -> list[str]:
    """``optim.betas``/``optim.eps`` set for an optimizer that has no such argument, or the wrong count of betas."""
    from timm.optim import get_optimizer_info

    name = cfg.name.lower()
    try:
        info = get_optimizer_info(name)
    except ValueError:  # not in timm's registry: optim.name's own check reports it
        return []
    changed = changed_moment_args(cfg)
    problems = []
    for key, has in (("betas", info.has_betas), ("eps", info.has_eps)):
        if key in changed and not has:
            problems.append(
                f"optim.{key}: the {name!r} optimizer has no {key} argument, so {changed[key]!r} would be "
                f"ignored; remove optim.{key} (or choose an optimizer that takes it, e.g. adamw)"
            )
    if (
        "betas" in changed
        and info.has_betas
        and len(cfg.betas) in (2, 3)
        and len(cfg.betas) != info.num_betas
    ):
        problems.append(
            f"optim.betas: the {name!r} optimizer takes {info.num_betas} betas, got {len(cfg.betas)} ({cfg.betas!r})"
        )
    return problems


def optimizer_package(name: str) -> str | None:
    """The optional package a timm optimizer comes from (``bitsandbytes``, ``apex``), None for built-in ones."""
    from timm.optim import get_optimizer_info

    try:
        opt_class = get_optimizer_info(name.lower()).opt_class
    except ValueError:
        return None
    return opt_class.split(".")[0] if isinstance(opt_class, str) else None


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

    def __init__(self, groups: list[dict], cfg: OptimConfig, stream: RoundingStream | None = None) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self._by_param: dict[nn.Parameter, torch.optim.Optimizer] = {}
        self._handles = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                opt = create_optimizer([{"params": [param], **options}], cfg, stream)
                self.optimizers.append(opt)
                self._by_param[param] = opt
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_param))

    def remove_hooks(self) -> None:
        """Detach every hook, so a replacement (the next stage's optimizer) is the only one stepping."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

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


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    embedding: Sequence[str] = (),
    classifier: Sequence[str] = (),
    stream: RoundingStream | None = None,
) -> torch.optim.Optimizer | StepInBackward:
    """The optimizer a recipe asks for: a normal one, or per-parameter updates inside backward.

    ``embedding`` and ``classifier`` (module names) are needed for ``optim.embed_lr_scale`` and
    ``optim.head_lr_scale``; see :func:`param_groups`. ``stream``: the model holds bf16 weights, updated
    by :func:`rounded_optimizer` with this stream's random bits.
    """
    groups = param_groups(model, cfg, embedding=embedding, classifier=classifier)
    if cfg.step_in_backward:
        return StepInBackward(groups, cfg, stream)
    return create_optimizer(groups, cfg, stream)
