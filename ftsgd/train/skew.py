"""Skewed classes: the class-weighted loss (``train.class_weights``) and the warning about a skewed dataset.

Class-balanced sampling (``data.sampler = "balanced"``) is a sample order, so it lives with the other
orders in :mod:`ftsgd.data.dataset`; this module holds what changes the loss, and the advice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ftsgd.data.folders import Split
from ftsgd.recipe.schema import BALANCED, Recipe

__all__ = ["SKEW_RATIO", "WeightedCrossEntropy", "class_counts", "class_weights", "skew_warnings"]

SKEW_RATIO = 10
"""Largest class over smallest class at which ``ftsgd train`` warns about skew."""


def class_counts(split: Split, num_classes: int) -> list[int]:
    """Images per class (in label order) of a split."""
    counts = [0] * num_classes
    for _, label in split.samples:
        counts[label] += 1
    return counts


def class_weights(recipe: Recipe, counts: Sequence[int]) -> list[float] | None:
    """The loss weight of each class: ``"balanced"`` is ``n / (k * n_c)`` (scikit-learn's), a list is taken as is.

    Balanced weights make every class contribute equally to the expected loss, and average 1 over the
    training images, so the learning rate keeps its meaning.
    """
    w = recipe.train.class_weights
    if not w:
        return None
    if w == BALANCED:
        total, k = sum(counts), len(counts)
        return [total / (k * c) if c else 0.0 for c in counts]
    return [float(v) for v in w]


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a weight per class, averaged over *images* (not over the weights).

    ``nn.CrossEntropyLoss(weight=...)`` divides by the batch's summed weights, which differ between
    micro-batches and processes, so its micro-batch losses would not add up to the batch's. Dividing by
    the number of images keeps gradient accumulation and torchrun jobs exact, as for the plain loss.
    """

    def __init__(self, weight: Sequence[float], label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(list(weight), dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_image = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
        return (per_image * self.weight[target]).mean()


def skew_warnings(recipe: Recipe, classes: Sequence[str], counts: Sequence[int]) -> list[str]:
    """A warning when the largest training class has :data:`SKEW_RATIO` times the images of the smallest.

    Said only when neither remedy is set; it names both, and the metrics that show a neglected class.
    """
    present = [(c, n) for c, n in zip(classes, counts, strict=True) if n]
    if len(present) < 2 or recipe.train.class_weights or recipe.data.sampler == BALANCED:
        return []
    big, small = max(present, key=lambda cn: cn[1]), min(present, key=lambda cn: cn[1])
    if big[1] < SKEW_RATIO * small[1]:
        return []
    return [
        f"the training classes are skewed: {big[0]!r} has {big[1]} images, {small[0]!r} {small[1]} "
        f"({big[1] / small[1]:.0f}x); accuracy then rewards ignoring small classes. Set "
        'data.sampler = "balanced" (or train.class_weights = "balanced"), and select by a metric that '
        'weighs every class alike: train.select_by = "val.balanced_accuracy" or "val.macro_f1"'
    ]
