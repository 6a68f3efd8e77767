"""Regularisers taken from timm as they are: Mixup/CutMix, soft-target loss, a moving average of the weights.

All are off in the paper's recipes. What this module adds to timm is what a resumable, memory-first
run needs around them:

- ``timm.data.Mixup`` draws its mixing parameters from numpy's *global* RNG. :func:`mix_batch` seeds it
  from ``(train.seed, epoch, step)`` for the call and puts the previous state back, exactly as
  :class:`ftsgd.data.ImageDataset` seeds each sample's augmentation, so a resumed run mixes every batch
  as the uninterrupted one did.
- Mixup needs an even batch (it pairs image ``i`` with image ``n - 1 - i``); the recipe checks
  ``train.batch_size``, and an odd last batch of an epoch is mixed without its final image, which keeps
  its own (smoothed) label.
- ``timm.utils.ModelEmaV3`` keeps one more copy of every weight and buffer on the training device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from ftsgd.data.dataset import sample_seed
from ftsgd.recipe.checks import mixes
from ftsgd.recipe.schema import Recipe
from ftsgd.train.skew import WeightedCrossEntropy

__all__ = ["build_ema", "build_loss", "build_mixup", "hard_labels", "mix_batch", "mix_seed"]


def build_mixup(recipe: Recipe, num_classes: int) -> Mixup | None:
    """timm's Mixup for the recipe's ``data.mixup*`` keys (None when both alphas are 0).

    Label smoothing (``train.label_smoothing``) is then applied by Mixup to the mixed targets.
    """
    if not mixes(recipe):
        return None
    d = recipe.data
    return Mixup(
        mixup_alpha=d.mixup,
        cutmix_alpha=d.cutmix,
        prob=d.mixup_prob,
        switch_prob=d.mixup_switch_prob,
        mode=d.mixup_mode,
        label_smoothing=recipe.train.label_smoothing,
        num_classes=num_classes,
    )


def build_loss(recipe: Recipe, mixup: Mixup | None, weights: Sequence[float] | None = None) -> nn.Module:
    """timm's SoftTargetCrossEntropy under Mixup (targets are mixed distributions), else cross-entropy,
    weighted per class with ``weights`` (``train.class_weights``, which the recipe refuses with mixing)."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if weights is not None:
        return WeightedCrossEntropy(weights, label_smoothing=recipe.train.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)


def mix_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the mixing in optimizer step ``step`` (0-based) of ``epoch``: a pure function of the three.

    Uses :func:`ftsgd.data.sample_seed` with negative indices, which no sample has, so the mixing never
    shares a seed with an image's augmentation.
    """
    return sample_seed(seed, epoch, -1 - step)


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded with ``seed`` inside, and exactly as it was outside."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


def mix_batch(mixup: Mixup, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch mixed by ``mixup`` with its randomness seeded by ``seed``; ``x`` itself is left unchanged.

    Returns:
        The mixed images and the soft targets (``len(y) x num_classes`` probabilities). In an odd batch
        the last image is not mixed and gets its own label (smoothed like the others).
    """
    even = len(y) - len(y) % 2
    x = x.clone()  # Mixup works in place; the caller's batch stays as it was
    targets = []
    if even:
        with _numpy_seeded(seed):
            targets.append(mixup(x[:even], y[:even])[1])  # mixes the view x[:even] in place
    if even < len(y):
        targets.append(mixup_target(y[even:], mixup.num_classes, 1.0, mixup.label_smoothing))
    return x, torch.cat(targets)


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices of a batch's targets: the labels themselves, or the most likely class of soft targets.

    Train accuracy under Mixup counts a prediction as correct when it is the class with the largest share
    of the mixed target (the image that covers more of the mix).
    """
    return y.argmax(dim=1) if y.ndim > 1 else y


def build_ema(model: nn.Module, recipe: Recipe) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of ``model`` (a copy on the model's device) for ``train.ema_decay > 0``, else None."""
    t = recipe.train
    if t.ema_decay <= 0:
        return None
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup)
    ema.requires_grad_(False)  # updated under no_grad only; never needs a gradient
    return ema
