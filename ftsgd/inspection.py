"""What ``ftsgd inspect`` reports: the embedding found, what a recipe freezes, what that saves.

Kept apart from the CLI so that the same data feeds the rich table, the plain lines and ``--json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ftsgd.errors import ModelError
from ftsgd.freeze import find_embedding, frozen_parameter_names, top_level_blocks
from ftsgd.memory import estimate_memory
from ftsgd.models import build_model
from ftsgd.recipe import Recipe


def inspect_model(recipe: Recipe, num_classes: int | None = None) -> dict[str, Any]:
    """Build the recipe's model and describe its embedding, frozen parameters and memory.

    Args:
        recipe: a validated recipe whose ``model.name`` is set.
        num_classes: classifier size for the task (None keeps the model's own head).

    Returns:
        A JSON-ready dict; the keys ``model``, ``policy``, ``embedding``, ``frozen``,
        ``trainable_params``, ``frozen_params``, ``total_params`` and ``memory`` are a stable
        contract for scripts.
    """
    if not recipe.model.name:
        raise ModelError("no model given: pass a timm model name, e.g. `ftsgd inspect vit_base_patch16_224`")
    model, weights_report = build_model(recipe.model, num_classes)
    embedding = find_embedding(model)
    frozen = frozen_parameter_names(model, recipe.freeze, embedding)
    frozen_set = set(frozen)
    total = sum(p.numel() for p in model.parameters())
    frozen_params = sum(p.numel() for n, p in model.named_parameters() if n in frozen_set)
    memory = estimate_memory(model, frozen_set, recipe.optim)
    blocks = top_level_blocks(model, frozen_set)
    return {
        "model": recipe.model.name,
        "recipe": recipe.name,
        "policy": recipe.freeze.policy,
        "optimizer": recipe.optim.name,
        "num_classes": getattr(model, "num_classes", num_classes),
        "embedding": list(embedding.modules),
        "embedding_first_module": embedding.first_module,
        "embedding_method": embedding.method,
        "embedding_checks": list(embedding.checks),
        "frozen": frozen,
        "trainable_params": total - frozen_params,
        "frozen_params": frozen_params,
        "total_params": total,
        "frozen_fraction": frozen_params / total if total else 0.0,
        "blocks": [dataclasses.asdict(b) for b in blocks],
        "memory": dataclasses.asdict(memory),
        "weights": dataclasses.asdict(weights_report) if weights_report else None,
    }
