"""LoRA adapters on a timm model, through the ``peft`` package, and back to a plain timm model.

PEFT's ``inject_adapter_in_model`` replaces each targeted layer in place by a LoRA layer that holds the
original one as ``base_layer``: the model stays the timm model (its class, ``forward``, ``get_classifier``,
``group_matcher``), so the trainer, DDP, checkpoints and the diagnostic see an ordinary module whose
trainable parameters are the adapters and the classifier. Only the names of the targeted layers' own
weights change (``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.qkv.base_layer.weight``).

The classifier trains fully, as PEFT's ``modules_to_save`` would, but in place: an export needs its
weights under the timm name, and a copy of it would only cost memory. :func:`merged_state_dict` folds the
adapters into the weights (W + alpha/r * B @ A, PEFT's own ``get_delta_weight``) under the timm names, so
``model.safetensors`` loads into a fresh ``timm.create_model`` with ``strict=True``;
:func:`adapter_state_dict` writes the adapters (and the classifier as a module to save) as PEFT saves them.

``peft`` is imported only when a recipe turns LoRA on (it pulls in transformers, seconds to import).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ftsgd.errors import RecipeError
from ftsgd.model.build import model_name
from ftsgd.recipe.schema import LoraConfig

__all__ = [
    "ADAPTER_NAME",
    "adapter_config",
    "adapter_names",
    "adapter_state_dict",
    "add_adapters",
    "default_targets",
    "has_adapters",
    "lora_layers",
    "merged_state_dict",
    "merged_weight",
    "plain_state_dict",
    "resolve_targets",
]

ADAPTER_NAME = "default"
"""PEFT's adapter name; the only adapter a run trains."""

_LORA_MARK = ".lora_"
"""What every adapter parameter's (and buffer's) name holds: ``lora_A``, ``lora_B``, ``lora_embedding_*``."""

_BASE = ".base_layer."
"""Where PEFT keeps a targeted layer's own weights."""

FAMILY_TARGETS: dict[str, list[str]] = {
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "convnext": ["fc1", "fc2"],
    "resnet": ["conv1", "conv2", "conv3"],
}
"""Default ``lora.targets`` per model family, as PEFT reads names (a module named so, or ending ``.NAME``)."""

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _family(model: nn.Module, candidates: Sequence[str]) -> str:
    kind = type(model).__name__.lower()
    if "convnext" in kind:
        return "convnext"
    if "resnet" in kind or "resnext" in kind:
        return "resnet"
    if any(n.endswith(".qkv") for n in candidates) or "vision" in kind or "vit" in kind:
        return "vit"
    return ""


def _adaptable(model: nn.Module, classifier: Iterable[str]) -> list[str]:
    """Layers PEFT's LoRA can adapt: Linear and ungrouped Conv layers, outside the classifier."""
    heads = tuple(classifier)
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, _SUPPORTED) or getattr(module, "groups", 1) != 1:
            continue
        if any(name == h or name.startswith(h + ".") for h in heads):
            continue
        out.append(name)
    return out


def _matches(pattern: str, name: str) -> bool:
    """PEFT's reading of a target (the name, or ``.NAME`` at its end), a glob over whole names, or ``re:``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def default_targets(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """The family's default target names (every Linear layer's name for a family without defaults)."""
    family = _family(model, candidates)
    if family:
        return FAMILY_TARGETS[family]
    return [n for n in candidates if isinstance(model.get_submodule(n), nn.Linear)]


def resolve_targets(
    model: nn.Module, cfg: LoraConfig, *, embedding: Iterable[str], classifier: Iterable[str]
) -> list[str]:
    """The names of the layers that get adapters, in ``named_modules()`` order.

    Given targets may name the embedding (a freeze policy that freezes it then refuses the run); the
    defaults never do: the paper's point is that the embedding is best left alone.

    Raises:
        RecipeError: A given target that matches no adaptable layer (with the closest names), or no
            layer at all to adapt.
    """
    candidates = _adaptable(model, classifier)
    if cfg.targets:
        problems, chosen = [], set()
        for pattern in cfg.targets:
            hits = {n for n in candidates if _matches(pattern, n)}
            if not hits:
                problems.append(_target_problem(model, pattern, candidates))
            chosen |= hits
        if problems:
            raise RecipeError(problems)
        return [n for n in candidates if n in chosen]
    embed = tuple(embedding)
    outside = [n for n in candidates if not any(n == e or n.startswith(e + ".") for e in embed)]
    defaults = default_targets(model, outside)
    chosen_names = [n for n in outside if any(_matches(p, n) for p in defaults)]
    if not chosen_names:
        raise RecipeError(
            f"lora.targets: {model_name(model)} has no layer the default targets match; name the layers to "
            f"adapt, e.g. lora.targets = {_examples(candidates)}"
        )
    return chosen_names


def _examples(candidates: Sequence[str]) -> str:
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in candidates))[:6]
    return "[" + ", ".join(f'"{n}"' for n in short) + "]"


def _target_problem(model: nn.Module, pattern: str, candidates: Sequence[str]) -> str:
    """The error line for a target that matches nothing, with the closest layer names as a hint."""
    bare = pattern[3:] if pattern.startswith("re:") else pattern
    short = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in candidates))
    close = difflib.get_close_matches(bare, [*short, *candidates], n=3, cutoff=0.5)
    hints = [f"close names: {', '.join(repr(c) for c in close)}"] if close else []
    hints.append(f"layers LoRA can adapt are named e.g. {_examples(candidates)} (Linear and ungrouped Conv)")
    hints.append("a name matches layers called so or ending in '.NAME'; globs match whole names")
    return f"lora.targets: {pattern!r} matches no layer of {model_name(model)} LoRA can adapt; " + "; ".join(
        hints
    )


def add_adapters(model: nn.Module, cfg: LoraConfig, targets: Sequence[str]) -> nn.Module:
    """Put LoRA adapters on ``targets`` (module names) in place; leaves every ``requires_grad`` as it was.

    PEFT freezes every other parameter when it injects; the caller decides what trains
    (:func:`ftsgd.model.prepare.prepare_model`), so the flags are restored and only the adapters' set.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets), bias="none"
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        if _LORA_MARK in name:
            param.requires_grad_(True)
        else:
            param.requires_grad_(before[name.replace(_BASE, ".")])
    return model


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(_LORA_MARK in n for n, _ in model.named_parameters())


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters' parameter names, in ``named_parameters()`` order."""
    return [n for n, _ in model.named_parameters() if _LORA_MARK in n]


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA layers of ``model`` (PEFT's ``LoraLayer`` modules), by name."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def plain_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Callable[[], torch.Tensor]]]:
    """``model``'s state under the timm names, adapters left out, and how to merge each adapted weight.

    Returns:
        ``(state, merges)``: the model's own tensors (no copies; an adapted layer's weight still without its
        adapter), and for each adapted weight's key a function giving the merged weight on the CPU, one
        layer at a time (:func:`merged_weight`), so an export never holds a second copy of the model.
    """
    state = model.state_dict() if state is None else state
    plain = {key.replace(_BASE, "."): value for key, value in state.items() if _LORA_MARK not in key}
    merges: dict[str, Callable[[], torch.Tensor]] = {}
    for name, layer in lora_layers(model):
        if ADAPTER_NAME in layer.lora_A:
            merges[f"{name}.weight"] = lambda layer=layer: merged_weight(layer)
    return plain, merges


@torch.no_grad()
def merged_weight(layer: nn.Module) -> torch.Tensor:
    """One LoRA layer's weight with its adapter merged: W + alpha/r * B @ A (PEFT's ``get_delta_weight``,
    in float32), on the CPU in W's dtype."""
    base = layer.get_base_layer()
    delta = layer.get_delta_weight(ADAPTER_NAME).float()
    merged = base.weight.detach().float() + delta.to(base.weight.device)
    return merged.to(device="cpu", dtype=base.weight.dtype)


def merged_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The plain timm state dict of ``model`` with the adapters merged into the weights.

    Adapter tensors are left out, so the result loads into a fresh timm model with ``strict=True``. Holds
    every merged weight at once; exports stream them instead (:func:`plain_state_dict`).
    """
    plain, merges = plain_state_dict(model, state)
    return {key: merges[key]() if key in merges else value for key, value in plain.items()}


def adapter_state_dict(model: nn.Module, classifier: Iterable[str]) -> dict[str, torch.Tensor]:
    """The adapters and the classifier as PEFT saves them (``adapter_model.safetensors``).

    Keys follow ``PeftModel.save_pretrained``: ``base_model.model.`` + the module path, the adapter name
    left out (``...qkv.lora_A.weight``); the classifier, a module to save, under its own name.
    """
    heads = tuple(classifier)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if _LORA_MARK in key:
            out["base_model.model." + key.replace(f".{ADAPTER_NAME}.", ".")] = value
        elif any(key.startswith(h + ".") for h in heads):
            out["base_model.model." + key] = value
    return out


def adapter_config(model: nn.Module, classifier: Sequence[str]) -> dict[str, Any]:
    """``adapter_config.json`` for the adapters ``model`` carries, as ``PeftModel.from_pretrained`` reads it."""
    from peft import LoraConfig as PeftLoraConfig

    layers = lora_layers(model)
    first = layers[0][1]
    dropout = first.lora_dropout[ADAPTER_NAME]
    config = PeftLoraConfig(
        r=int(first.r[ADAPTER_NAME]),
        lora_alpha=first.lora_alpha[ADAPTER_NAME],
        lora_dropout=float(getattr(dropout, "p", 0.0)),
        target_modules=[name for name, _ in layers],
        modules_to_save=list(classifier),
        bias="none",
        inference_mode=True,
    )
    data = config.to_dict()
    data["auto_mapping"] = {
        "base_model_class": type(model).__name__,
        "parent_library": type(model).__module__,
    }
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
