"""The model as a recipe fine-tunes it: built, weights loaded, embedding found, parameters frozen.

``ftsgd inspect`` previews exactly what ``ftsgd train`` will do, so both start from the same
:func:`prepare_model` and report the same :meth:`PreparedModel.freeze_report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ftsgd.errors import RecipeError
from ftsgd.model.build import (
    WeightsReport,
    build_model,
    classifier_modules,
    enable_grad_checkpointing,
    head_note,
)
from ftsgd.model.data_config import data_config_for
from ftsgd.model.embedding import Embedding, find_embedding
from ftsgd.model.freeze import apply_freeze, frozen_parameter_names, match_patterns
from ftsgd.recipe.schema import FreezeConfig, LoraConfig, Recipe, stage_label, stage_recipes

__all__ = ["PreparedModel", "freeze_names", "lora_message", "prepare_model", "refreeze", "stage_freezes"]


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to fine-tune and how it got that way.

    Attributes:
        model: The timm model on the CPU, frozen parameters with ``requires_grad=False``.
        weights_report: What loading ``model.weights`` did (None: no file was loaded).
        data_config: Preprocessing at the training resolution (``input_size``, ``mean``, ``std``, ...).
        embedding: The detected embedding and how it was found.
        frozen: Names of the frozen parameters, in ``named_parameters()`` order.
        fixed: Parameters the model itself keeps fixed (``requires_grad=False`` before any freezing,
            e.g. sin-cos position embeddings): a later stage never switches them on.
        head: What happened to the classifier (re-initialised or kept, and why); "" when unknown.
        held: With LoRA adapters: the backbone weights LoRA keeps fixed in every stage (all but the
            adapters, the classifier and ``freeze.trainable``); () without.
        lora_targets: The layers that carry LoRA adapters; () without.
    """

    model: nn.Module
    weights_report: WeightsReport | None
    data_config: dict[str, Any]
    embedding: Embedding
    frozen: tuple[str, ...]
    fixed: tuple[str, ...] = ()
    head: str = ""
    held: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def frozen_params(self) -> int:
        frozen = set(self.frozen)
        return sum(p.numel() for n, p in self.model.named_parameters() if n in frozen)

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates (a model may keep some fixed on its own, e.g. sin-cos embeddings)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def freeze_report(self) -> dict[str, Any]:
        """What is frozen, in the keys ``inspect --json`` and ``summary.json`` share."""
        return {
            "embedding": list(self.embedding.modules),
            "frozen": list(self.frozen),
            "frozen_params": self.frozen_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "weights_report": asdict(self.weights_report) if self.weights_report else None,
            "head": self.head,
            **({"lora_targets": list(self.lora_targets)} if self.lora_targets else {}),
        }


def prepare_model(recipe: Recipe, num_classes: int | None, *, from_checkpoint: bool = False) -> PreparedModel:
    """Build ``recipe.model`` for ``num_classes`` classes and apply ``recipe.freeze``.

    Args:
        recipe: A validated recipe whose ``model.name`` is set.
        num_classes: Size of the task's classifier (None keeps the architecture's own head).
        from_checkpoint: The weights will come from a run's checkpoint: neither the starting weights
            file nor the hub is read (the file may have moved since; the checkpoint holds every weight).

    Raises:
        ModelError, WeightsError, RecipeError: see :func:`ftsgd.model.build.build_model` and
            :func:`ftsgd.model.freeze.frozen_parameter_names`.
    """
    start = replace(recipe.model, weights="", pretrained=False) if from_checkpoint else recipe.model
    dtype = torch.bfloat16 if recipe.train.weight_dtype == "bf16" else None  # held so from the start
    model, weights_report = build_model(start, num_classes, dtype)
    data_config = data_config_for(model, recipe.data)
    embedding = find_embedding(model, data_config["input_size"])
    targets: tuple[str, ...] = ()
    if recipe.lora.enabled:
        from ftsgd.model.lora import add_adapters, resolve_targets

        classifier = classifier_modules(model, embedding.execution_order)
        targets = tuple(
            resolve_targets(model, recipe.lora, embedding=embedding.modules, classifier=classifier)
        )
        add_adapters(model, recipe.lora, targets)  # its random A init is drawn from the run's seed
    fixed = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    held = _held_by_lora(model, recipe.freeze, embedding, fixed) if targets else ()
    frozen = freeze_names(model, recipe.freeze, embedding, held)
    apply_freeze(model, frozen)
    if recipe.train.grad_checkpointing:
        enable_grad_checkpointing(model, recipe.model.name)
    head = "" if from_checkpoint else head_note(start, weights_report, model, num_classes)
    return PreparedModel(
        model, weights_report, data_config, embedding, tuple(frozen), fixed, head, held, targets
    )


def _held_by_lora(
    model: nn.Module, cfg: FreezeConfig, embedding: Embedding, fixed: tuple[str, ...]
) -> tuple[str, ...]:
    """What LoRA keeps fixed: every parameter but the adapters, the classifier and ``freeze.trainable``."""
    from ftsgd.model.lora import adapter_names

    names = [n for n, _ in model.named_parameters()]
    classifier = classifier_modules(model, embedding.execution_order)
    keep = set(adapter_names(model)) | set(fixed)
    keep |= {n for n in names if any(n.startswith(c + ".") for c in classifier)}
    keep |= match_patterns("freeze.trainable", cfg.trainable, model, names)
    return tuple(n for n in names if n not in keep)


def freeze_names(
    model: nn.Module, cfg: FreezeConfig, embedding: Embedding, held: tuple[str, ...] = ()
) -> list[str]:
    """What ``cfg`` freezes, plus what LoRA holds fixed (``held``), in ``named_parameters()`` order.

    Raises:
        RecipeError: As :func:`frozen_parameter_names`; and with adapters, a policy or pattern (other
            than a linear probe's ``head``, see :func:`ftsgd.recipe.checks.lora_probe_problems`) that
            would freeze some of them.
    """
    frozen = set(frozen_parameter_names(model, cfg, embedding))
    if held:
        from ftsgd.model.lora import adapter_names

        clash = [n for n in adapter_names(model) if n in frozen]
        if clash and cfg.policy != "head":
            layers = sorted({n.split(".lora_")[0] for n in clash})
            raise RecipeError(
                f"freeze.policy: {cfg.policy!r} (with freeze.patterns {cfg.patterns}) freezes the LoRA adapters "
                f"of {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}, so they would never train; "
                "leave those layers out of lora.targets, or freeze less"
            )
        frozen |= set(held)
    return [n for n, _ in model.named_parameters() if n in frozen]


def lora_message(cfg: LoraConfig, targets: tuple[str, ...]) -> str:
    """The start line's note on LoRA adapters ("" without): rank, scale and how many layers carry them."""
    if not targets:
        return ""
    return f"\nLoRA: rank {cfg.r}, alpha {cfg.alpha:g}, dropout {cfg.dropout:g} on {len(targets)} layers"


def refreeze(prepared: PreparedModel, cfg: FreezeConfig) -> PreparedModel:
    """Switch the model to another stage's ``[freeze]``; the result describes the model as it now is.

    Parameters frozen before but not by ``cfg`` get ``requires_grad`` back (never those the model keeps
    fixed itself); newly frozen ones lose it. BatchNorm modes follow from ``requires_grad`` at the next
    :func:`ftsgd.model.freeze.train_mode`.
    """
    frozen = freeze_names(prepared.model, cfg, prepared.embedding, prepared.held)
    release = set(prepared.frozen) - set(frozen) - set(prepared.fixed)
    for name, param in prepared.model.named_parameters():
        if name in release:
            param.requires_grad_(True)
    apply_freeze(prepared.model, frozen)
    return replace(prepared, frozen=tuple(frozen))


def stage_freezes(prepared: PreparedModel, recipe: Recipe) -> list[dict[str, Any]]:
    """What each ``[[stage]]`` of ``recipe`` freezes on this model (counts), without changing it."""
    sizes = {n: p.numel() for n, p in prepared.model.named_parameters()}
    rows = []
    for index, stage in enumerate(stage_recipes(recipe) if recipe.stages else []):
        frozen = set(freeze_names(prepared.model, stage.freeze, prepared.embedding, prepared.held))
        fixed = set(prepared.fixed) - frozen
        rows.append(
            {
                "stage": index + 1,
                "name": stage_label(recipe, index),
                "epochs": stage.train.epochs,
                "policy": stage.freeze.policy,
                "optimizer": stage.optim.name,
                "lr": stage.optim.lr,
                "frozen_tensors": len(frozen),
                "frozen_params": sum(sizes[n] for n in frozen),
                "trainable_params": sum(v for n, v in sizes.items() if n not in frozen and n not in fixed),
            }
        )
    return rows
