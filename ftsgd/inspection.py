"""What ``ftsgd inspect`` reports: the embedding found, what a recipe freezes, what that saves.

Kept apart from the CLI so that the same data feeds the rich table, the plain lines and ``--json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ftsgd import console
from ftsgd.diagnose import (
    DEFAULT_BATCHES,
    GradientDiagnostic,
    check_png_path,
    diagnose_from_recipe,
    plot_diagnostic,
)
from ftsgd.errors import ModelError
from ftsgd.freeze import (
    apply_freeze,
    classifier_modules,
    find_embedding,
    frozen_parameter_names,
    top_level_blocks,
)
from ftsgd.memory import estimate_memory, measure_activations
from ftsgd.models import build_model, model_data_config
from ftsgd.optim import lr_per_layer
from ftsgd.recipe import Recipe


def inspect_model(
    recipe: Recipe,
    num_classes: int | None = None,
    *,
    batch_size: int | None = None,
    img_size: int | None = None,
    activations: bool = True,
) -> dict[str, Any]:
    """Build the recipe's model and describe its embedding, frozen parameters and memory.

    Args:
        recipe: a validated recipe whose ``model.name`` is set.
        num_classes: classifier size for the task (None keeps the model's own head).
        batch_size: images per forward/backward pass for the activation measurement; None uses the
            recipe's micro-batch (``train.micro_batch_size``, or ``train.batch_size``).
        img_size: input resolution; None uses ``data.img_size`` or the model's own.
        activations: measure activation memory (training-mode forward passes on the recipe's device,
            under its autocast dtype, with its freezing and gradient checkpointing).

    Returns:
        A JSON-ready dict; the keys ``model``, ``policy``, ``embedding``, ``frozen``,
        ``trainable_params``, ``frozen_params``, ``total_params`` and ``memory`` are a stable
        contract for scripts.
    """
    if not recipe.model.name:
        raise ModelError("no model given: pass a timm model name, e.g. `ftsgd inspect vit_base_patch16_224`")
    model, weights_report = build_model(recipe.model, num_classes)
    size = img_size or recipe.data.img_size
    input_size = tuple(model_data_config(model)["input_size"])
    if size:
        input_size = (input_size[0], size, size)
    embedding = find_embedding(model, input_size)
    frozen = frozen_parameter_names(model, recipe.freeze, embedding)
    frozen_set = set(frozen)
    total = sum(p.numel() for p in model.parameters())
    frozen_params = sum(p.numel() for n, p in model.named_parameters() if n in frozen_set)
    apply_freeze(model, frozen)  # as training does: the learning rates are those of what trains
    lrs = lr_per_layer(model, recipe.optim, embedding.modules, classifier_modules(model, embedding))
    measured = None
    if activations:
        measured = _measure(model, recipe, frozen_set, input_size, batch_size)
    memory = estimate_memory(model, frozen_set, recipe.optim, activations=measured)
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
        "learning_rates": [
            {**dataclasses.asdict(r), "lrs": [recipe.optim.lr * s for s in r.lr_scales]} for r in lrs
        ],
        "memory": {
            **dataclasses.asdict(memory),
            "input_size": list(input_size),
            "activations_method": measured.method if measured else "not measured",
        },
        "weights": dataclasses.asdict(weights_report) if weights_report else None,
    }


def _measure(
    model: Any, recipe: Recipe, frozen: set[str], input_size: tuple[int, ...], batch_size: int | None
) -> Any:
    """Activation memory on the device and under the autocast dtype training would use."""
    from ftsgd.train import enable_grad_checkpointing, resolve_amp, resolve_device

    t = recipe.train
    batch = batch_size or t.micro_batch_size or t.batch_size
    if t.grad_checkpointing:
        enable_grad_checkpointing(model, recipe.model.name)  # the same check and message as training
    device = resolve_device(t.device)
    model.to(device)
    try:
        return measure_activations(
            model,
            input_size,
            batch,
            frozen=frozen,
            grad_checkpointing=t.grad_checkpointing,
            amp_dtype=resolve_amp(t.amp, device),
        )
    except RuntimeError as exc:
        hint = ""
        if hasattr(model, "patch_embed"):
            hint = (
                f"; a ViT is built for one input size: pass model.kwargs={{img_size={input_size[-1]}}} "
                "or --img-size matching the model"
            )
        raise ModelError(f"cannot measure activation memory of {recipe.model.name}: {exc}{hint}") from None


def run_diagnostic(
    recipe: Recipe, data: Path, batches: int | None, png: Path | None, num_classes: int | None
) -> GradientDiagnostic:
    """The gradient diagnostic of ``ftsgd inspect --data`` (and its ``--png`` plot).

    ``batches`` None means :data:`ftsgd.diagnose.DEFAULT_BATCHES`.
    """
    if png is not None:
        check_png_path(png)  # before minutes of work, not after
    if not recipe.model.weights and not recipe.model.pretrained:
        console.warn(
            "no --weights: measuring randomly initialised weights; the diagnostic is meant for the "
            "pretrained weights you will fine-tune"
        )
    result = diagnose_from_recipe(recipe, data, batches or DEFAULT_BATCHES, num_classes)
    if png is not None:
        plot_diagnostic(result, png)
    return result
