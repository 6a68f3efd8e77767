"""Find a model's first "embedding" layer: the modules the paper's recipe freezes.

Kumar et al. (ICLR 2024) show that SGD fine-tuning matches AdamW once the first layer -- the patch
embedding of a ViT, the stem of a CNN -- is frozen, because that layer's fine-tuning gradients are
much larger than the rest of the network's. Which modules make up "the embedding" differs per
architecture, and a hand-written table would silently go stale as timm adds models, so this module
derives it from the model itself:

1. A forward pass on a dummy image records, with forward pre-hooks, the order in which the modules
   that own parameters run (:func:`execution_order`). The first one is where pixels enter.
2. The embedding is the outermost module enclosing that first module which is still "stem-like"
   (it runs first and in one piece, fewer parameterised modules run inside it than after it, and it
   holds at most half the parameters -- a stem, not a backbone container like VGG's ``features``),
   plus normalisation layers that are its siblings and run right after it (CLIP's ``norm_pre``,
   ResNet's ``bn1``, DenseNet's ``norm0``).
3. The result is cross-checked against what timm itself says -- ``pretrained_cfg['first_conv']`` and
   the ``stem`` regex of ``model.group_matcher()`` -- and each agreement or disagreement is recorded
   so ``ftsgd inspect`` can show the user why a layer was chosen.

timm's ``group_matcher()`` helpers live here too: the freeze policies of :mod:`ftsgd.model.freeze`
that follow timm's groups (``stem``, ``embed+stage1``) read it the same way.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftsgd.errors import first_line
from ftsgd.model.build import cfg_names, classifier_modules, model_name

__all__ = ["Embedding", "execution_order", "find_embedding"]

#: Module names that timm (and torchvision) use for the input embedding. Only used as a cross-check
#: note in :attr:`Embedding.checks`; detection never depends on it.
WELL_KNOWN_EMBEDDING_NAMES = frozenset(
    {
        "patch_embed",
        "norm_pre",
        "stem",
        "conv_stem",
        "bn1",
        "conv1",
        "root",
        "features.conv0",
        "features.norm0",
        "features.0",
        "conv_proj",
        "embeddings",
        # hybrid ViTs: the stem of the CNN inside the patch embedding (timm's HybridEmbed)
        "patch_embed.backbone",
        "patch_embed.backbone.stem",
        "patch_embed.backbone.conv1",
        "patch_embed.backbone.bn1",
    }
)

#: A module enclosing the first executed module is only accepted as "the embedding" if it holds at
#: most this fraction of the model's parameters (and fewer parameterised modules than run after it):
#: otherwise it is the backbone container (torchvision's ``features``), not a stem.
MAX_EMBEDDING_FRACTION = 0.5

_DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass(frozen=True)
class Embedding:
    """The modules frozen as "the embedding", and how they were found.

    Attributes:
        modules: Module names frozen as the embedding, e.g. ``("patch_embed", "norm_pre")``,
            ``("stem",)`` or ``("conv1", "bn1")``.
        first_module: First module with parameters that the pixels pass through (execution order),
            e.g. ``"patch_embed.proj"``.
        method: One line saying how the embedding was found, shown by ``ftsgd inspect``.
        checks: Notes on agreement or disagreement with ``pretrained_cfg['first_conv']``,
            ``group_matcher()['stem']`` and well-known embedding module names.
        execution_order: Names of the modules that own parameters, in the order the dummy forward
            pass ran them (registration order when the forward pass failed). Kept so the other
            policies (``head`` on plain ``torch.nn`` models, ``embed+stage1``) need no second pass.
    """

    modules: tuple[str, ...]
    first_module: str
    method: str
    checks: tuple[str, ...]
    execution_order: tuple[str, ...] = field(default=(), repr=False, compare=False)


# --------------------------------------------------------------------------------------------------
# small helpers


def _under(name: str, module: str) -> bool:
    """Whether parameter/module ``name`` is ``module`` itself or lies inside it ("" is the root)."""
    return module == "" or name == module or name.startswith(module + ".")


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of a module name, outermost first, without the root: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_norm(module: nn.Module) -> bool:
    """Normalisation layers: torch's, timm's (``LayerNorm2d``, ``BatchNormAct2d``, ``RmsNorm``...)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _owns_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_leaves(model: nn.Module) -> list[str]:
    """Modules that own parameters directly and have no descendant that does.

    ``BatchNormAct2d`` has (parameter-free) ``act``/``drop`` children, so "leaf" in the plain module
    tree sense would miss it; a model owning ``pos_embed`` next to parameterised children is not a
    leaf, which keeps the root out of the execution order.
    """
    owners = [name for name, m in model.named_modules() if _owns_params(m)]
    enclosing = {a for name in owners if name for a in ["", *_ancestors(name)]}
    return [n for n in owners if n not in enclosing]


def _numel_under(model: nn.Module, modules: Iterable[str]) -> int:
    mods = tuple(modules)
    return sum(p.numel() for n, p in model.named_parameters() if any(_under(n, m) for m in mods))


# --------------------------------------------------------------------------------------------------
# execution order


def _input_size_candidates(
    model: nn.Module, input_size: tuple[int, int, int] | None
) -> list[tuple[int, ...]]:
    """Dummy input sizes to try, best first.

    ``pretrained_cfg['input_size']`` is the size the weights were trained at, but a model created with
    ``img_size=64`` keeps the cfg of the 224 model while its patch embedding insists on 64, so the
    patch embedding's own ``img_size`` (and the first conv's ``in_channels``) are tried as well.
    An explicit ``input_size`` goes first; the derived sizes remain fallbacks, because a training
    resolution a fixed-size ViT cannot take should not cost the user the forward-pass detection.
    """
    sizes: list[tuple[int, ...]] = [tuple(input_size)] if input_size is not None else []
    try:
        from timm.data import resolve_data_config

        resolved = tuple(resolve_data_config({}, model=model)["input_size"])
    except Exception:
        resolved = _DEFAULT_INPUT_SIZE
    channels = resolved[0]
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first_conv is not None:
        channels = first_conv.in_channels
    patch = getattr(model, "patch_embed", None)
    img = getattr(patch, "img_size", None)
    if isinstance(img, int):
        img = (img, img)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        sizes.append((channels, img[0], img[1]))
    sizes += [(channels, *resolved[1:]), tuple(resolved), (channels, *_DEFAULT_INPUT_SIZE[1:])]
    return list(dict.fromkeys(sizes))


def execution_order(
    model: nn.Module, input_size: tuple[int, int, int] | None = None
) -> tuple[list[str], tuple[int, ...] | None, str]:
    """Run one dummy forward pass and list the parameter-owning modules in the order they ran.

    The model is put in eval mode for the pass (so BatchNorm statistics are untouched and batch 1
    works) and every module's ``training`` flag is restored afterwards, including BatchNorm layers
    that :func:`train_mode` deliberately left in eval.

    Args:
        model: Any ``nn.Module``; timm models get their input size from ``pretrained_cfg``.
        input_size: ``(C, H, W)`` of the dummy image; ``None`` derives it from the model.

    Returns:
        ``(order, size, error)``: names of the modules that ran, in first-call order (modules whose
        weights are used functionally, like ``nn.MultiheadAttention.out_proj``, or that never ran
        are absent); the input size that worked (``None`` if none did); and the error of the last
        failed attempt ("" if the first size worked). When every attempt fails the order is the
        registration order of all parameter-owning modules, usually but not always the execution
        order.
    """
    leaves = _param_leaves(model)
    leaf_set = set(leaves)
    try:
        ref = next(model.parameters())
    except StopIteration:
        ref = next(model.buffers(), torch.empty(0))
    order: list[str] = []
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in model.named_modules() if n in leaf_set]
    error = ""
    try:
        model.eval()
        for size in _input_size_candidates(model, input_size):
            order.clear()
            seen.clear()
            x = torch.zeros((1, *size), dtype=ref.dtype if ref.is_floating_point() else torch.float32)
            try:
                with torch.no_grad():
                    model(x.to(ref.device))
            except Exception as exc:  # any architecture-specific size/channel complaint: try the next
                error = f"{type(exc).__name__}: {first_line(exc)}"
                continue
            if order:
                return list(order), size, error
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return list(leaves), None, error or "the forward pass ran no module with parameters"


# --------------------------------------------------------------------------------------------------
# timm metadata


def _group_matcher(model: nn.Module) -> dict[str, Any] | None:
    """``model.group_matcher(coarse=True)`` when the model has a dict-style one, else ``None``."""
    fn = getattr(model, "group_matcher", None)
    if not callable(fn):
        return None
    try:
        gm = fn(coarse=True)
    except TypeError:
        try:
            gm = fn()
        except Exception:
            return None
    except Exception:
        return None
    return gm if isinstance(gm, dict) else None


def _compile_matcher(gm: dict[str, Any]) -> list[tuple[re.Pattern[str], tuple[int, ...], Any]]:
    """Compile a group_matcher dict exactly as ``timm.models._manipulate.group_with_matcher`` does."""
    compiled: list[tuple[re.Pattern[str], tuple[int, ...], Any]] = []
    for ordinal, (_group, spec) in enumerate(gm.items()):
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            compiled += [(re.compile(s[0]), (ordinal,), s[1]) for s in spec]
        else:
            compiled.append((re.compile(spec), (ordinal,), None))
    return compiled


def _group_key(name: str, compiled: list[tuple[re.Pattern[str], tuple[int, ...], Any]]) -> tuple[float, ...]:
    """timm's ordering key of a parameter: (group ordinal, regex groups..., suffix); inf if unmatched.

    ``re.match`` (anchored at the start) as in timm, so ``'^conv_stem|bn1'`` does not match
    ``blocks.0.0.bn1``.
    """
    for regex, prefix, suffix in compiled:
        found = regex.match(name)
        if found:
            parts = [prefix, found.groups(), suffix]
            return tuple(float(v) for part in parts if part for v in part if v is not None)
    return (math.inf,)


def _stem_group(model: nn.Module) -> tuple[list[str], str] | None:
    """Parameter names timm's ``group_matcher()`` puts in its ``stem`` group, and the regex text."""
    gm = _group_matcher(model)
    if gm is None or "stem" not in gm:
        return None
    ordinal = list(gm).index("stem")
    compiled = _compile_matcher(gm)
    names = [n for n, _ in model.named_parameters() if _group_key(n, compiled)[:1] == (float(ordinal),)]
    spec = gm["stem"]
    return names, spec if isinstance(spec, str) else str(spec)


def _first_stage_from_matcher(model: nn.Module, exclude: set[str]) -> list[str] | None:
    """Parameters of the first block group after the stem in timm's coarse ``group_matcher()``.

    Groups are ordered by timm's key; groups ending in 99999 (``MATCH_PREV_GROUP``: the final norm
    merged into the last stage) and unmatched parameters (the head) never count as the first stage.
    """
    gm = _group_matcher(model)
    if gm is None:
        return None
    stem_ordinal = float(list(gm).index("stem")) if "stem" in gm else None
    compiled = _compile_matcher(gm)
    keys = {n: _group_key(n, compiled) for n, _ in model.named_parameters() if n not in exclude}
    candidates = [
        k for k in keys.values() if math.isfinite(k[0]) and k[0] != stem_ordinal and k[-1] != 99999.0
    ]
    if not candidates:
        return None
    first = min(candidates)
    return [n for n, k in keys.items() if k == first]


# --------------------------------------------------------------------------------------------------
# embedding detection


def find_embedding(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> Embedding:
    """Find the first "embedding" layer of ``model`` from the model itself.

    Args:
        model: A timm model or any plain ``torch.nn`` model.
        input_size: ``(C, H, W)`` of the dummy forward pass; ``None`` uses the model's data config
            (``pretrained_cfg['input_size']``, the patch embedding's ``img_size``) or 3x224x224.

    Returns:
        The :class:`Embedding`; its ``checks`` say whether timm's own metadata agrees.

    Raises:
        ValueError: The model has no parameters at all.
    """
    order, size, error = execution_order(model, input_size)
    if not order:
        raise ValueError(f"{model_name(model)} has no parameters: nothing to freeze")
    modules = dict(model.named_modules())
    first = order[0]
    classifier = classifier_modules(model, order)
    total_params = sum(p.numel() for p in model.parameters())
    accepted = next(
        (a for a in _ancestors(first) if _is_stem_like(model, a, order, classifier, total_params)), None
    )
    hybrid = _hybrid_stem(model, first, order)
    accepted = hybrid or accepted
    main = accepted if accepted is not None else first
    chosen = _with_following_norms(main, order, modules, classifier)

    if size is None:
        how = f"registration order (forward pass failed: {error})"
    else:
        how = f"forward pass on 1x{'x'.join(map(str, size))}"
        if input_size is not None and tuple(size) != tuple(input_size):
            how += f" (1x{'x'.join(map(str, input_size))} failed: {error})"
    desc = _describe(model, how, first, accepted, chosen)
    if hybrid is not None:
        desc += f"; hybrid: the CNN stem of {_backbone_of(hybrid)!r}, not its projection or stages"
    embedding_params = [n for n, _ in model.named_parameters() if any(_under(n, m) for m in chosen)]
    checks = _cross_checks(model, first, tuple(chosen), embedding_params)
    return Embedding(
        modules=tuple(chosen),
        first_module=first,
        method=desc,
        checks=tuple(checks),
        execution_order=tuple(order),
    )


def _with_following_norms(
    main: str, order: list[str], modules: dict[str, nn.Module], classifier: tuple[str, ...]
) -> list[str]:
    """``main`` plus the normalisation layers that are its siblings and run straight after it.

    They belong to the embedding (ResNet ``bn1``, EfficientNet ``bn1``, CLIP ``norm_pre``, DenseNet
    ``norm0``); the first module of any other kind ends the list.
    """
    position = {n: i for i, n in enumerate(order)}
    chosen = [main]
    last = max(position[n] for n in order if _under(n, main))
    for name in order[last + 1 :]:
        if (
            _parent(name) == _parent(main)
            and _is_norm(modules[name])
            and not any(_under(name, c) for c in classifier)
        ):
            chosen.append(name)
        else:
            break
    return chosen


HYBRID_BACKBONE = "backbone"
"""Child name of the CNN inside a hybrid ViT's patch embedding (timm's ``HybridEmbed.backbone``)."""


def _backbone_of(name: str) -> str:
    """The ``...backbone`` module a name lies in (the name itself when it is one)."""
    parts = name.split(".")
    cut = max(i for i, part in enumerate(parts) if part == HYBRID_BACKBONE)
    return ".".join(parts[: cut + 1])


def _hybrid_stem(model: nn.Module, first: str, order: list[str]) -> str | None:
    """The conv stem of a hybrid ViT, when the first layer lies in a CNN ``backbone`` in front of a projection.

    A hybrid's patch embedding (timm's ``HybridEmbed``: R26/R50+ViT, ViTamin, the MobileCLIP ViT)
    runs a CNN, or only a CNN's stem, and then projects its features into tokens. The layer that maps
    pixels to features is that CNN's stem, not the projection (12.6% of R+ViT-Ti/16) and not the CNN's
    stages (40% of R26+ViT-S/32). Inside the backbone, the outermost module that contains the first
    layer, runs first in one piece, holds at most half the backbone, and is followed by a larger
    sibling (a stage) is the stem; a backbone with no such module is a stem itself (ResNetV2's
    stem-only variant, MobileCLIP's ConvStem). Returns None when the first layer is in no backbone.
    """
    path = [*_ancestors(first), first]
    backbone = next((a for a in path if a.rpartition(".")[2] == HYBRID_BACKBONE), None)
    if backbone is None:
        return None
    inner = [n for n in order if _under(n, backbone)]
    size = _numel_under(model, [backbone])
    for candidate in (a for a in path if a.startswith(backbone + ".")):
        inside = [n for n in inner if _under(n, candidate)]
        if inner[: len(inside)] != inside or _numel_under(model, [candidate]) > MAX_EMBEDDING_FRACTION * size:
            continue
        parent = _parent(candidate)
        after = Counter(_top_under(n, parent) for n in inner[len(inside) :] if _under(n, parent))
        if any(count > len(inside) for count in after.values()):
            return candidate
    return backbone


def _top_under(name: str, parent: str) -> str:
    """The child of ``parent`` that ``name`` lies in (``name`` must lie inside ``parent``)."""
    rest = name[len(parent) + 1 :] if parent else name
    head = rest.split(".", 1)[0]
    return f"{parent}.{head}" if parent else head


def _is_stem_like(
    model: nn.Module, candidate: str, order: list[str], classifier: tuple[str, ...], total_params: int
) -> bool:
    """Whether ``candidate``, an ancestor of the first module that runs, is a stem rather than a backbone."""
    inside = [n for n in order if _under(n, candidate)]
    # (1) it runs first and in one piece
    if order[: len(inside)] != inside:
        return False
    # (2) more of the body (not the classifier) runs after it than inside it: a stem, not the
    # backbone container (DenseNet/VGG ``features``)
    rest = [n for n in order[len(inside) :] if not any(_under(n, c) for c in classifier)]
    if len(rest) <= len(inside):
        return False
    # (3) a small part of the network
    return _numel_under(model, [candidate]) <= MAX_EMBEDDING_FRACTION * max(total_params, 1)


def _describe(model: nn.Module, how: str, first: str, accepted: str | None, chosen: list[str]) -> str:
    """The one line ``ftsgd inspect`` prints under "found by"."""
    modules = dict(model.named_modules())
    frac = _numel_under(model, chosen) / max(sum(p.numel() for p in model.parameters()), 1)
    desc = f"{how}: first parameterised module {first!r} ({type(modules[first]).__name__})"
    if accepted is not None:
        desc += f", enclosing stem-like module {accepted!r} ({type(modules[accepted]).__name__})"
    if len(chosen) > 1:
        desc += f", + following norm {', '.join(repr(c) for c in chosen[1:])}"
    return desc + f"; {frac:.2%} of parameters"


def _cross_checks(
    model: nn.Module, first: str, chosen: tuple[str, ...], embedding_params: list[str]
) -> list[str]:
    """Compare the detected embedding with timm's metadata; one human-readable line per source."""
    checks: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = cfg_names(cfg.get("first_conv"))
    if not first_conv:
        checks.append("pretrained_cfg first_conv: not available")
    elif first in first_conv:
        checks.append(f"pretrained_cfg first_conv {cfg.get('first_conv')!r}: agrees with {first!r}")
    else:
        checks.append(
            f"pretrained_cfg first_conv {cfg.get('first_conv')!r}: DISAGREES, forward pass ran {first!r} first"
        )
    stem = _stem_group(model)
    if stem is None:
        checks.append("group_matcher stem: not available")
    else:
        stem_names, regex = stem
        stem_set = set(stem_names)
        missing = [n for n in embedding_params if n not in stem_set]
        extra = [n for n in stem_names if n not in set(embedding_params)]
        if missing:
            checks.append(
                f"group_matcher stem {regex!r}: DISAGREES, does not match {len(missing)} embedding "
                f"parameter(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        elif extra:
            checks.append(
                f"group_matcher stem {regex!r}: agrees (also matches {', '.join(extra[:4])}"
                f"{', ...' if len(extra) > 4 else ''})"
            )
        else:
            checks.append(f"group_matcher stem {regex!r}: agrees exactly")
    unusual = [m for m in chosen if m not in WELL_KNOWN_EMBEDDING_NAMES]
    if unusual:
        checks.append(f"module names: {', '.join(unusual)} not among the well-known embedding names")
    else:
        checks.append("module names: well-known embedding names")
    return checks
