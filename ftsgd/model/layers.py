"""A model's parameters as depth-ordered layer groups: embedding, the blocks in between, head.

Two features need the same picture of "which layer is this parameter in": the gradient diagnostic
(one gradient norm per layer group) and per-layer learning rates (one multiplier per layer). Both use
timm's own grouping, ``model.group_matcher(coarse=False)`` as ``timm.models.group_parameters``
resolves it -- exactly what timm's ``param_groups_layer_decay`` uses for layer-wise LR decay: one
group per transformer block (ViT ``blocks.3``) or residual block (ConvNeXt ``stages.2.blocks.1``,
ResNet ``layer3.0``), the final norm merged into the last block, unmatched parameters (the head)
last. Models without a ``group_matcher`` (plain ``torch.nn``) are grouped by top-level child.

On top of that grouping, the embedding found by :func:`ftsgd.model.embedding.find_embedding` and the
classifier are carved out as groups of their own, so the embedding is compared with the layers after
it exactly as it is frozen (a ViT's ``patch_embed`` without ``pos_embed``/``cls_token``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["LayerGroup", "group_label", "layer_groups", "layer_map", "under_any"]

#: How many module names a group label lists before it says "+ N more".
MAX_LABEL_PARTS = 3


@dataclass(frozen=True)
class LayerGroup:
    """One depth unit of a model.

    Attributes:
        name: Label made of the largest modules the group holds entirely, e.g. ``"blocks.3"``,
            ``"blocks.5 + norm"``, ``"cls_token + pos_embed"``, ``"patch_embed"``.
        kind: ``"embedding"``, ``"middle"`` (everything between embedding and classifier) or
            ``"head"`` (the classifier).
        parameters: Parameter names in ``model.named_parameters()`` order.
    """

    name: str
    kind: str
    parameters: tuple[str, ...]


def under_any(name: str, modules: Sequence[str]) -> bool:
    """Whether parameter ``name`` lies inside one of ``modules`` (dotted module names)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def layer_map(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter as timm's ``param_groups_layer_decay`` computes it.

    ``group_matcher(coarse=False)`` resolved by ``timm.models.group_parameters`` where the model has
    one, else timm's ``auto_group_layers`` fallback (chunks of parameters, the
    ``pretrained_cfg['classifier']`` last). Frozen parameters are included, as in timm.
    """
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        return dict(group_parameters(model, model.group_matcher(coarse=False), reverse=True))
    from timm.optim._param_groups import auto_group_layers

    return dict(auto_group_layers(model))


def _children_map(model: nn.Module) -> dict[str, int]:
    """Layer id per parameter by top-level child (direct parameters are their own unit), in order."""
    ids: dict[str, int] = {}
    out: dict[str, int] = {}
    for name, _ in model.named_parameters():
        out[name] = ids.setdefault(name.split(".", 1)[0], len(ids))
    return out


def group_label(names: Sequence[str], all_names: Sequence[str]) -> str:
    """Name a set of parameters by the largest modules it holds entirely.

    ``blocks.5.*`` plus ``norm.*`` is ``"blocks.5 + norm"``; ConvNeXt's ``stages.1.downsample.*``
    plus ``stages.1.blocks.0.*`` is ``"stages.1.downsample + stages.1.blocks.0"`` (not
    ``"stages.1"``, which also holds later blocks).
    """
    inside = set(names)
    total: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for name in all_names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            total[prefix] += 1
            held[prefix] += name in inside
    units: list[str] = []
    for name in names:
        parts = name.split(".")
        prefixes = (".".join(parts[:k]) for k in range(1, len(parts) + 1))
        unit = next(p for p in prefixes if held[p] == total[p])
        if unit not in units:
            units.append(unit)
    if len(units) > MAX_LABEL_PARTS:
        return " + ".join(units[:MAX_LABEL_PARTS]) + f" + {len(units) - MAX_LABEL_PARTS} more"
    return " + ".join(units)


def layer_groups(
    model: nn.Module, embedding: Sequence[str] = (), classifier: Sequence[str] = ()
) -> list[LayerGroup]:
    """The model's parameters as layer groups in depth order: embedding, middle groups, head.

    Args:
        model: A timm model (grouped by ``group_matcher(coarse=False)``) or any ``nn.Module``
            (grouped by top-level child).
        embedding: Module names of the embedding (``Embedding.modules``); its parameters form the
            first group, whatever timm's stem group also holds.
        classifier: Module names of the classifier; its parameters form the last group.

    Returns:
        Non-empty groups; every parameter (frozen or not) is in exactly one.
    """
    names = [n for n, _ in model.named_parameters()]
    ids = layer_map(model) if hasattr(model, "group_matcher") else _children_map(model)
    fallback = max(ids.values(), default=0)
    emb = [n for n in names if under_any(n, embedding)]
    head = [n for n in names if under_any(n, classifier) and n not in set(emb)]
    taken = set(emb) | set(head)
    middle: dict[int, list[str]] = {}
    for name in names:
        if name not in taken:
            middle.setdefault(ids.get(name, fallback), []).append(name)
    groups = [LayerGroup(" + ".join(embedding), "embedding", tuple(emb))] if emb else []
    groups += [
        LayerGroup(group_label(members, names), "middle", tuple(members))
        for _, members in sorted(middle.items())
    ]
    if head:
        groups.append(LayerGroup(" + ".join(classifier), "head", tuple(head)))
    return groups
