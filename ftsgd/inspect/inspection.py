"""What ``ftsgd inspect`` reports: the embedding found, what a recipe freezes, what that saves.

Kept apart from the CLI so that the same data feeds the rich table, the plain lines and ``--json``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ftsgd.errors import ModelError
from ftsgd.inspect.diagnose import (
    DEFAULT_BATCHES,
    GradientDiagnostic,
    check_png_path,
    diagnose_from_recipe,
    plot_diagnostic,
)
from ftsgd.inspect.memory import (
    ActivationMeasurement,
    MemoryEstimate,
    estimate_memory,
    job_memory,
    measure_activations,
    state_comparison,
)
from ftsgd.model.build import classifier_modules
from ftsgd.model.freeze import top_level_blocks
from ftsgd.model.optim import lr_per_layer
from ftsgd.model.prepare import PreparedModel, prepare_model, stage_freezes
from ftsgd.recipe.schema import Recipe, stage_recipes
from ftsgd.train.parallel import shard_units
from ftsgd.utils import console
from ftsgd.utils.device import resolve_amp, resolve_device

EMBED_WARN_FRACTION = 0.02
"""``ftsgd inspect`` warns when the embedding holds more than this fraction of the parameters.

The paper's embeddings are under 1% (ViT-B/16 0.68%, CNN stems far less); a larger one is often a
whole block or backbone taken for the stem. Small ViTs with large patches are legitimately above it
(ViT-Ti/16 2.6%, ViT-S/32 5.2%), hence a warning that asks to check, not an error."""


def inspect_model(
    recipe: Recipe,
    num_classes: int | None = None,
    *,
    batch_size: int | None = None,
    img_size: int | None = None,
    activations: bool = True,
    nproc: int | None = None,
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
        nproc: also estimate the memory per GPU of a ``torchrun`` job of this many processes, with DDP and
            with FSDP (``train.shard``): ``memory_per_process``.

    A recipe with ``[[stage]]`` tables is described as its last stage trains (the stage whose best
    epoch is exported); ``stages`` then lists what each stage freezes.

    Returns:
        A JSON-ready dict; the keys ``model``, ``policy``, ``embedding``, ``frozen``,
        ``trainable_params``, ``frozen_params``, ``total_params`` and ``memory`` are a stable
        contract for scripts.
    """
    if not recipe.model.name:
        raise ModelError("no model given: pass a timm model name, e.g. `ftsgd inspect vit_base_patch16_224`")
    staged, recipe = recipe, stage_recipes(recipe)[-1]  # a staged recipe: its last stage, the one exported
    prepared = prepare_model(recipe, num_classes)
    model = prepared.model
    input_size = tuple(prepared.data_config["input_size"])
    if img_size:
        input_size = (input_size[0], img_size, img_size)
    frozen_set = set(prepared.frozen)
    measured = _measure(prepared, recipe, input_size, batch_size) if activations else None
    memory = estimate_memory(
        model, frozen_set, recipe.optim, activations=measured, ema=recipe.train.ema_decay > 0
    )
    report = prepared.freeze_report()
    weights = report.pop("weights_report")
    embedding = prepared.embedding
    embedded = _numel(model, embedding.modules)
    classifier = classifier_modules(model, embedding.execution_order)
    lrs = lr_per_layer(model, recipe.optim, embedding.modules, classifier)  # of what trains, freeze applied
    per_process = (
        _job(prepared, recipe, memory, input_size, batch_size, nproc, activations) if nproc else None
    )
    return {
        "model": recipe.model.name,
        "recipe": staged.name,
        "policy": recipe.freeze.policy,
        "optimizer": recipe.optim.name,
        "num_classes": getattr(model, "num_classes", num_classes),
        **report,
        "embedding_first_module": embedding.first_module,
        "embedding_method": embedding.method,
        "embedding_checks": list(embedding.checks),
        "frozen_fraction": prepared.frozen_params / max(prepared.total_params, 1),
        "embedding_fraction": embedded / max(prepared.total_params, 1),
        "warnings": embedding_warnings(recipe.model.name, embedding.modules, embedded, prepared.total_params),
        "blocks": [dataclasses.asdict(b) for b in top_level_blocks(model, frozen_set)],
        "learning_rates": [
            {**dataclasses.asdict(r), "lrs": [recipe.optim.lr * s for s in r.lr_scales]} for r in lrs
        ],
        "memory": _memory_report(prepared, memory, input_size, measured),
        "weights": weights,
        **({"memory_per_process": per_process} if per_process else {}),
        **({"stages": stage_freezes(prepared, staged)} if staged.stages else {}),
    }


def _memory_report(
    prepared: PreparedModel,
    memory: MemoryEstimate,
    input_size: tuple[int, ...],
    measured: ActivationMeasurement | None,
) -> dict[str, Any]:
    """``inspect``'s ``memory``: the estimate, and with LoRA the full fine-tunings' training state beside it."""
    compared = (
        {
            "state_compared": state_comparison(
                prepared.model, memory, prepared.embedding.modules, prepared.fixed
            )
        }
        if prepared.lora_targets
        else {}
    )
    return {
        **dataclasses.asdict(memory),
        **compared,
        "input_size": list(input_size),
        "activations_method": measured.method if measured else "not measured",
    }


def _job(
    prepared: PreparedModel,
    recipe: Recipe,
    estimate: MemoryEstimate,
    input_size: tuple[int, ...],
    batch_size: int | None,
    nproc: int,
    activations: bool,
) -> dict[str, Any]:
    """Memory per GPU with ``nproc`` processes; activations at the micro-batch each GPU then runs.

    The global batch is shared by the processes, so a GPU runs ``min(micro_batch_size, batch_size / N)``
    images per forward pass (``--batch-size`` sets it directly).
    """
    t = recipe.train
    micro = batch_size or min(t.micro_batch_size or t.batch_size, math.ceil(t.batch_size / nproc))
    measured = _measure(prepared, recipe, input_size, micro) if activations else None
    per_gpu = job_memory(
        prepared.model,
        estimate,
        nproc,
        units=shard_units(prepared.model),
        activations=measured.bytes if measured else 0,
    )
    return {"nproc": nproc, "micro_batch": micro, **{k: dataclasses.asdict(v) for k, v in per_gpu.items()}}


def _numel(model: Any, modules: tuple[str, ...]) -> int:
    """Parameter elements inside the named modules."""
    inside = tuple(f"{m}." for m in modules)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(inside))


def embedding_warnings(name: str, modules: tuple[str, ...], embedded: int, total: int) -> list[str]:
    """A warning when the embedding ``embed`` would freeze is more than :data:`EMBED_WARN_FRACTION` of the model."""
    fraction = embedded / max(total, 1)
    if fraction <= EMBED_WARN_FRACTION:
        return []
    return [
        f'freeze.policy = "embed" would freeze {fraction:.1%} of {name}\'s parameters ({embedded:,} of '
        f"{total:,}: {', '.join(modules)}), more than {EMBED_WARN_FRACTION:.0%}. The paper's embedding is the "
        "first layer that maps pixels to features, under 1% of a model (ViT-B/16 0.68%); small ViTs with large "
        "patches are legitimately above 2%, but check that this is only the stem, not a backbone, and adjust "
        "with freeze.patterns / freeze.trainable"
    ]


def _measure(
    prepared: PreparedModel, recipe: Recipe, input_size: tuple[int, ...], batch_size: int | None
) -> Any:
    """Activation memory on the device and under the autocast dtype training would use."""
    t = recipe.train
    model = prepared.model
    device = resolve_device(t.device)
    model.to(device)
    try:
        return measure_activations(
            model,
            input_size,
            batch_size or t.micro_batch_size or t.batch_size,
            frozen=set(prepared.frozen),
            grad_checkpointing=t.grad_checkpointing,
            amp_dtype=resolve_amp(t.amp, device, t.weight_dtype),
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
    target = check_png_path(png) if png is not None else None  # before minutes of work, not after
    if not recipe.model.weights and not recipe.model.pretrained:
        console.warn(
            "no --weights: measuring randomly initialised weights; the diagnostic is meant for the "
            "pretrained weights you will fine-tune"
        )
    result = diagnose_from_recipe(recipe, data, batches or DEFAULT_BATCHES, num_classes)
    for message in result.data_warnings:
        console.warn(message)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        plot_diagnostic(result, target)
    return result
