"""Accuracy, top-5, loss, per-class accuracy and the confusion matrix of a model on one split.

Per-class numbers are reported for every class of the model, including classes a split lacks
(``n = 0``, accuracy ``None``), so results from different splits line up class by class -- under
distribution shift the average often hides that a few classes collapse. The confusion matrix says
which classes they collapse into.

:func:`logits_of` is the one forward pass of inference: ``ftsgd eval`` (through :func:`evaluate`) and
``ftsgd predict`` both call it, so the two cannot disagree about a prediction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ftsgd.infer.metrics import metrics_from_counts
from ftsgd.utils.device import autocast
from ftsgd.utils.distributed import all_reduce_sum

__all__ = ["CONFUSION_MAX_CLASSES", "evaluate", "logits_of"]

CONFUSION_MAX_CLASSES = 1024
"""Classes up to which the confusion matrix is counted (1024 x 1024 counts are 8 MiB on the device). A
21k-class model's matrix would take gigabytes; beyond this only the per-class counts are kept."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    class_names: list[str],
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on every batch of ``loader``.

    Counts (the confusion matrix, top-5 hits, the summed loss) are accumulated on ``device`` and read
    back in one copy at the end, so evaluation does not synchronise with the GPU after every batch;
    accuracy and per-class accuracy are read off the confusion matrix, so all of them come from the
    same pass.

    Args:
        model: Classifier returning logits of shape ``(batch, len(class_names))``. It is put in eval
            mode for the call and returned to its previous mode afterwards, because the caller is
            usually in the middle of training.
        loader: Yields ``(images, labels)`` with labels indexing ``class_names``.
        device: Where the model lives; batches are moved there.
        class_names: The model's classes, in label order.
        amp_dtype: Autocast dtype (bf16/fp16), None for none (see :func:`ftsgd.device.autocast`). Loss and accuracy
            are computed from float32 logits either way.
        channels_last: Feed images in channels-last memory format (match the model's format).

    Returns:
        ``{"accuracy", "loss", "n", "macro_f1", "balanced_accuracy", "per_class", "confusion"}`` plus
        ``"top5"`` when there are more than five classes. ``accuracy``/``top5`` are fractions in [0, 1],
        ``loss`` the mean cross-entropy, ``macro_f1``/``balanced_accuracy`` as :mod:`ftsgd.infer.metrics`
        defines them, ``per_class`` maps every class name to ``{"accuracy": float | None, "n": int,
        "precision", "recall", "f1", "support"}``,
        ``confusion[i][j]`` counts the images of class ``class_names[i]`` predicted as ``class_names[j]``
        (rows: true class, columns: predicted class, both in ``class_names`` order); ``confusion`` is
        left out above :data:`CONFUSION_MAX_CLASSES` classes.

    Raises:
        ValueError: An empty loader, or logits whose width does not match ``class_names``.
    """
    num_classes = len(class_names)
    if num_classes == 0:
        raise ValueError("class_names is empty")
    want_top5 = num_classes > 5
    was_training = model.training
    model.eval()

    # confusion[true, predicted]; accuracy and per-class counts are its diagonal and row sums
    full = num_classes <= CONFUSION_MAX_CLASSES
    counts = torch.zeros(num_classes**2 if full else 3 * num_classes, dtype=torch.long, device=device)
    top5_correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    non_blocking = device.type == "cuda"
    try:
        for images, labels in loader:
            labels = labels.to(device, non_blocking=non_blocking)
            logits = logits_of(model, images, device=device, amp_dtype=amp_dtype, channels_last=channels_last)
            # [: len(labels)]: blank images (data.BlankFill) of a job's process without images count for nothing
            logits = logits[: len(labels)]
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)}, expected (batch, {num_classes}) "
                    "for the given class_names"
                )
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            counts += _count(labels, logits.argmax(dim=1), num_classes, full)
            if want_top5:
                top5 = logits.topk(5, dim=1).indices
                top5_correct += (top5 == labels[:, None]).any(dim=1).sum()
    finally:
        model.train(was_training)
    # the one device-to-host copy (counts stay exact in float64 up to 2**53 images); in a torchrun job
    # every process evaluated a disjoint part of the split, so one all-reduce gives the whole split's sums
    packed = all_reduce_sum(torch.cat([counts.double(), top5_correct.double()[None], loss_sum[None]]))
    *flat, top5_hits, loss_total = packed.tolist()
    return _results(class_names, [int(c) for c in flat], int(top5_hits), loss_total, want_top5, full)


def _count(labels: torch.Tensor, predicted: torch.Tensor, k: int, full: bool) -> torch.Tensor:
    """One batch's counts: confusion cells (``true * k + predicted``), or per-class totals, hits, predictions."""
    if full:
        return torch.bincount(labels * k + predicted, minlength=k * k)
    return torch.bincount(
        torch.cat([labels, k + labels[predicted == labels], 2 * k + predicted]), minlength=3 * k
    )


def _results(
    class_names: list[str], counts: list[int], top5_hits: int, loss_total: float, want_top5: bool, full: bool
) -> dict[str, Any]:
    """:func:`evaluate`'s dictionary from the flat counts (see :func:`_count`), top-5 hits and summed loss."""
    k = len(class_names)
    matrix = [counts[i * k : (i + 1) * k] for i in range(k)] if full else None
    total_l = [sum(row) for row in matrix] if matrix else counts[:k]
    correct_l = [matrix[i][i] for i in range(k)] if matrix else counts[k : 2 * k]
    predicted_l = [sum(row[j] for row in matrix) for j in range(k)] if matrix else counts[2 * k :]
    n = sum(total_l)
    if n == 0:
        raise ValueError("cannot evaluate on an empty loader")
    results: dict[str, Any] = {"accuracy": sum(correct_l) / n}
    if want_top5:
        results["top5"] = top5_hits / n
    results["loss"] = loss_total / n
    results["n"] = n
    scores = metrics_from_counts(correct_l, total_l, predicted_l, class_names)
    results["macro_f1"] = scores["macro_f1"]
    results["balanced_accuracy"] = scores["balanced_accuracy"]
    results["per_class"] = {
        name: {"accuracy": (c / t if t else None), "n": t, "predicted": int(p), **scores["per_class"][name]}
        for name, c, t, p in zip(class_names, correct_l, total_l, predicted_l, strict=True)
    }
    if matrix is not None:
        results["confusion"] = matrix
    return results


@torch.no_grad()
def logits_of(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """The float32 logits of a batch: moved to ``device``, under the run's autocast, first output only.

    The one forward pass of evaluation and prediction, so ``ftsgd eval`` and ``ftsgd predict`` compute
    the same logits for the same image. The model's train/eval mode is left to the caller.
    """
    images = images.to(device, non_blocking=device.type == "cuda")
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        out = model(images)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()
