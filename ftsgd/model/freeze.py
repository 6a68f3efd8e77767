"""Turn a freeze policy into parameter names, freeze them, and keep frozen BatchNorm layers still.

What the policies freeze is found by :mod:`ftsgd.model.embedding` (the embedding, timm's groups);
this module applies a recipe's ``[freeze]`` section on top of it: the policy, extra ``patterns`` and
``trainable`` exceptions, each pattern checked to match something so a typo never freezes nothing.
Policies (``FreezeConfig.policy``), as the authors' code froze them:

======================  ==========================================================================
``none``                nothing
``embed``               the embedding (never ``pos_embed`` / ``cls_token`` / ``reg_token``)
``embed+stage1``        the embedding plus the first stage or block group (ConvNeXt ``stages.0``,
                        ResNet ``layer1``, ViT ``blocks.0``) from timm's coarse ``group_matcher()``
``stem``                everything timm's ``group_matcher()`` ``stem`` group matches (for ViTs this
                        includes the position embedding and tokens); ``embed`` without one
``head``                everything except the classifier (linear probing)
======================  ==========================================================================
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftsgd.errors import RecipeError
from ftsgd.model.build import classifier_modules, model_name
from ftsgd.model.embedding import (
    MAX_EMBEDDING_FRACTION,
    Embedding,
    _ancestors,
    _first_stage_from_matcher,
    _numel_under,
    _param_leaves,
    _stem_group,
    _under,
    execution_order,
    find_embedding,
)
from ftsgd.recipe.schema import FREEZE_POLICIES, FreezeConfig

__all__ = [
    "BlockRow",
    "apply_freeze",
    "frozen_parameter_names",
    "match_patterns",
    "top_level_blocks",
    "train_mode",
]


@dataclass(frozen=True)
class BlockRow:
    """One row of the per-block freeze summary printed by ``ftsgd inspect``.

    Attributes:
        name: Top-level child module name, or a parameter owned directly by the model
            (``pos_embed``, ``cls_token``).
        type: Class name of the module (``"Parameter"`` for a direct parameter).
        params: Number of parameter elements.
        frozen_params: How many of those are frozen.
        status: ``"frozen"``, ``"trainable"`` or ``"partial"``.
    """

    name: str
    type: str
    params: int
    frozen_params: int
    status: str


def _first_stage_fallback(model: nn.Module, embedding: Embedding, classifier: tuple[str, ...]) -> list[str]:
    """The first module after the embedding that holds parameters, for models without group_matcher.

    Starting from the first parameterised module that runs after the embedding, take its outermost
    ancestor that does not contain the embedding; while that is a container holding most of the
    remaining body (ViT's ``blocks``, ConvNeXt's ``stages``), step into its first child that runs.
    """
    order = list(embedding.execution_order) or _param_leaves(model)

    def outside(n: str) -> bool:
        return not any(_under(n, m) for m in embedding.modules) and not any(_under(n, c) for c in classifier)

    nxt = next((n for n in order if outside(n)), None)
    if nxt is None:
        return []
    chain = [*_ancestors(nxt), nxt]
    candidates = [a for a in chain if not any(_under(m, a) for m in embedding.modules)]
    current = candidates[0]
    remaining = sum(p.numel() for n, p in model.named_parameters() if outside(n))
    while current != nxt and _numel_under(model, [current]) > MAX_EMBEDDING_FRACTION * remaining:
        current = chain[chain.index(current) + 1]
    return [n for n, _ in model.named_parameters() if _under(n, current)]


def _compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate for one ``freeze.patterns`` / ``freeze.trainable`` entry (glob or ``re:REGEX``)."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _pattern_problem(key: str, pattern: str, model: nn.Module, names: list[str]) -> str:
    """The error line for a pattern that matches nothing, with the closest names as a hint.

    Candidates are parameter names and, written as globs (``blocks.0.*``), module names, so a typo
    in ``blcks.0.*`` suggests ``blocks.0.*`` rather than a single parameter.
    """
    module_names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
    hints: list[str] = []
    bare = pattern[3:] if pattern.startswith("re:") else pattern
    if bare in module_names:
        hints.append(f"{bare!r} is a module; use '{bare}.*' for all its parameters")
    candidates = names + [f"{m}.*" for m in module_names]
    close = difflib.get_close_matches(bare, candidates, n=3, cutoff=0.5)
    if close:
        hints.append("close names: " + ", ".join(repr(c) for c in close))
    if pattern.startswith("re:"):
        hints.append(
            f"regexes are searched in names like {names[0]!r}" if names else "the model has no parameters"
        )
    else:
        hints.append("globs must match whole parameter names (e.g. 'blocks.0.*'); prefix 're:' for a regex")
    return f"{key}: {pattern!r} matches no parameter of {model_name(model)}; " + "; ".join(hints)


def match_patterns(key: str, patterns: Sequence[str], model: nn.Module, names: list[str]) -> set[str]:
    """Names matched by ``patterns``; every pattern must match something (typos freeze nothing)."""
    matched: set[str] = set()
    problems: list[str] = []
    for pattern in patterns:
        try:
            pred = _compile_pattern(pattern)
        except re.error as exc:
            problems.append(f"{key}: {pattern!r} is not a valid regular expression ({exc})")
            continue
        hits = {n for n in names if pred(n)}
        if not hits:
            problems.append(_pattern_problem(key, pattern, model, names))
        matched |= hits
    if problems:
        raise RecipeError(problems)
    return matched


def frozen_parameter_names(
    model: nn.Module, cfg: FreezeConfig, embedding: Embedding | None = None
) -> list[str]:
    """Names of the parameters that ``cfg`` freezes, in ``model.named_parameters()`` order.

    Args:
        model: The model to fine-tune.
        cfg: The ``[freeze]`` recipe section: policy, extra ``patterns``, ``trainable`` exceptions.
        embedding: A :func:`find_embedding` result to reuse; computed when a policy needs it.

    Returns:
        Parameter names to freeze: policy + patterns, minus ``trainable``.

    Raises:
        RecipeError: Unknown policy, a pattern that matches no parameter, an invalid regex, or
            ``head`` on a model without a classifier.
    """
    names = [n for n, _ in model.named_parameters()]
    policy = cfg.policy
    if policy not in FREEZE_POLICIES:
        raise RecipeError(
            f"freeze.policy: unknown policy {policy!r}; choose one of {', '.join(FREEZE_POLICIES)}"
        )

    def get_embedding() -> Embedding:
        return embedding if embedding is not None else find_embedding(model)

    frozen: set[str] = set()
    if policy in ("embed", "embed+stage1"):
        emb = get_embedding()
        frozen = {n for n in names if any(_under(n, m) for m in emb.modules)}
        if policy == "embed+stage1":
            stage = _first_stage_from_matcher(model, exclude=frozen)
            if stage is None:
                classifier = classifier_modules(model, emb.execution_order)
                stage = _first_stage_fallback(model, emb, classifier)
            frozen |= set(stage)
    elif policy == "stem":
        stem = _stem_group(model)
        if stem is not None and stem[0]:
            frozen = set(stem[0])
        else:
            emb = get_embedding()
            frozen = {n for n in names if any(_under(n, m) for m in emb.modules)}
    elif policy == "head":
        order = None
        if not hasattr(model, "get_classifier"):
            order = embedding.execution_order if embedding is not None else execution_order(model)[0]
        classifier = classifier_modules(model, order)
        if not classifier:
            raise RecipeError(
                f"freeze.policy: 'head' needs a classifier, and {model_name(model)} has none with "
                "parameters (created with num_classes=0?)"
            )
        frozen = {n for n in names if not any(_under(n, c) for c in classifier)}

    frozen |= match_patterns("freeze.patterns", cfg.patterns, model, names)
    frozen -= match_patterns("freeze.trainable", cfg.trainable, model, names)
    return [n for n in names if n in frozen]


def apply_freeze(model: nn.Module, names: Iterable[str]) -> None:
    """Set ``requires_grad=False`` on exactly the named parameters; leave all others untouched.

    Others are deliberately not switched back on: some models keep parameters fixed on purpose
    (e.g. fixed sin-cos position embeddings), and un-freezing them would change the model.

    Raises:
        ValueError: A name is not a parameter of ``model`` (a caller bug, not a user mistake: user
            patterns are validated by :func:`frozen_parameter_names`).
    """
    wanted = set(names)
    if not wanted:
        return
    params = dict(model.named_parameters())
    unknown = sorted(wanted - params.keys())
    if unknown:
        raise ValueError(f"not parameters of {model_name(model)}: {', '.join(unknown[:5])}")
    for name in wanted:
        params[name].requires_grad_(False)


def _is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm-type: anything tracking running statistics (torch, timm BatchNormAct2d, SyncBN)."""
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but keep BatchNorm layers whose parameters are all frozen in eval mode.

    A frozen BatchNorm in train mode would still normalise with batch statistics and overwrite its
    running mean/variance, so the "frozen" embedding would change what it computes. Layers without
    affine parameters (``affine=False``) have nothing to decide by and stay in train mode.
    """
    model.train()
    for module in model.modules():
        if not _is_batchnorm(module):
            continue
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()


def top_level_blocks(model: nn.Module, frozen: Iterable[str] | set[str]) -> list[BlockRow]:
    """Per top-level child (and per parameter owned by the model itself) freeze summary.

    Rows come in ``named_parameters()`` order; children without parameters (dropout, pooling) are
    left out because they have nothing to freeze.
    """
    frozen_set = set(frozen)
    rows: dict[str, list[Any]] = {}
    children = {n: type(m).__name__ for n, m in model.named_children()}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        kind = children.get(top, "Parameter") if "." in name else "Parameter"
        row = rows.setdefault(top, [kind, 0, 0])
        row[1] += p.numel()
        row[2] += p.numel() if name in frozen_set else 0
    out = []
    for name, (kind, total, frz) in rows.items():
        status = "frozen" if frz == total else "trainable" if frz == 0 else "partial"
        out.append(BlockRow(name=name, type=kind, params=total, frozen_params=frz, status=status))
    return out
