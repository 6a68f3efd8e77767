"""The model as a recipe fine-tunes it: built, weights loaded, embedding found, parameters frozen.

``ftsgd inspect`` previews exactly what ``ftsgd train`` will do, so both start from the same
:func:`prepare_model` and report the same :meth:`PreparedModel.freeze_report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from ftsgd.freeze import Embedding, apply_freeze, find_embedding, frozen_parameter_names
from ftsgd.models import WeightsReport, build_model, data_config_for, enable_grad_checkpointing, head_note
from ftsgd.recipe import Recipe

__all__ = ["PreparedModel", "prepare_model"]


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to fine-tune and how it got that way.

    Attributes:
        model: The timm model on the CPU, frozen parameters with ``requires_grad=False``.
        weights_report: What loading ``model.weights`` did (None: no file was loaded).
        data_config: Preprocessing at the training resolution (``input_size``, ``mean``, ``std``, ...).
        embedding: The detected embedding and how it was found.
        frozen: Names of the frozen parameters, in ``named_parameters()`` order.
        head: What happened to the classifier (re-initialised or kept, and why); "" when unknown.
    """

    model: nn.Module
    weights_report: WeightsReport | None
    data_config: dict[str, Any]
    embedding: Embedding
    frozen: tuple[str, ...]
    head: str = ""

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
        }


def prepare_model(recipe: Recipe, num_classes: int | None, *, from_checkpoint: bool = False) -> PreparedModel:
    """Build ``recipe.model`` for ``num_classes`` classes and apply ``recipe.freeze``.

    Args:
        recipe: A validated recipe whose ``model.name`` is set.
        num_classes: Size of the task's classifier (None keeps the architecture's own head).
        from_checkpoint: The weights will come from a run's checkpoint: neither the starting weights
            file nor the hub is read (the file may have moved since; the checkpoint holds every weight).

    Raises:
        ModelError, WeightsError, RecipeError: see :func:`ftsgd.models.build_model` and
            :func:`ftsgd.freeze.frozen_parameter_names`.
    """
    start = replace(recipe.model, weights="", pretrained=False) if from_checkpoint else recipe.model
    model, weights_report = build_model(start, num_classes)
    data_config = data_config_for(model, recipe.data)
    embedding = find_embedding(model, data_config["input_size"])
    frozen = frozen_parameter_names(model, recipe.freeze, embedding)
    apply_freeze(model, frozen)
    if recipe.train.grad_checkpointing:
        enable_grad_checkpointing(model, recipe.model.name)
    head = "" if from_checkpoint else head_note(start, weights_report, model, num_classes)
    return PreparedModel(model, weights_report, data_config, embedding, tuple(frozen), head)
