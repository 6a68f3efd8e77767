"""Accuracy, top-5, loss and per-class accuracy of a model on one split.

Per-class numbers are reported for every class of the model, including classes a split lacks
(``n = 0``, accuracy ``None``), so results from different splits line up class by class -- under
distribution shift the average often hides that a few classes collapse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ftsgd.device import autocast
from ftsgd.distributed import all_reduce_sum, multi_process


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

    Counts are accumulated on ``device`` and read back once at the end, so evaluation does not
    synchronise with the GPU after every batch.

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
        ``{"accuracy", "loss", "n", "per_class"}`` plus ``"top5"`` when there are more than five
        classes. ``accuracy``/``top5`` are fractions in [0, 1], ``loss`` the mean cross-entropy,
        ``per_class`` maps every class name to ``{"accuracy": float | None, "n": int}``.

    Raises:
        ValueError: An empty loader, or logits whose width does not match ``class_names``.
    """
    num_classes = len(class_names)
    if num_classes == 0:
        raise ValueError("class_names is empty")
    want_top5 = num_classes > 5
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    top5_correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    non_blocking = device.type == "cuda"
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=non_blocking)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=non_blocking)
            with autocast(device, amp_dtype):
                out = model(images)
            # [: len(labels)]: blank images (data.BlankFill) of a job's process without images count for nothing
            logits = (out[0] if isinstance(out, (tuple, list)) else out).float()[: len(labels)]
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)}, expected (batch, {num_classes}) "
                    "for the given class_names"
                )
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            hit = logits.argmax(dim=1) == labels
            total += torch.bincount(labels, minlength=num_classes)
            correct += torch.bincount(labels[hit], minlength=num_classes)
            if want_top5:
                top5 = logits.topk(5, dim=1).indices
                top5_correct += (top5 == labels[:, None]).any(dim=1).sum()
    finally:
        model.train(was_training)

    correct, total, top5_correct, loss_sum = _sum_over_processes(correct, total, top5_correct, loss_sum)
    total_l, correct_l = total.tolist(), correct.tolist()
    n = sum(total_l)
    if n == 0:
        raise ValueError("cannot evaluate on an empty loader")
    results: dict[str, Any] = {"accuracy": sum(correct_l) / n}
    if want_top5:
        results["top5"] = int(top5_correct.item()) / n
    results["loss"] = float(loss_sum.item()) / n
    results["n"] = n
    results["per_class"] = {
        name: {"accuracy": (c / t if t else None), "n": t}
        for name, c, t in zip(class_names, correct_l, total_l, strict=True)
    }
    return results


def _sum_over_processes(
    correct: torch.Tensor, total: torch.Tensor, top5_correct: torch.Tensor, loss_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counts and loss sums of every process of a multi-process job added up, in one all-reduce.

    Each process evaluated a disjoint part of the split (nothing padded, nothing twice), so the sums
    are exactly the one-process counts. Counts travel as float64, exact far beyond any dataset size.
    In a one-process run the tensors come back unchanged.
    """
    if not multi_process():
        return correct, total, top5_correct, loss_sum
    k = correct.numel()
    packed = torch.cat([correct.double(), total.double(), top5_correct.double().view(1), loss_sum.view(1)])
    all_reduce_sum(packed)
    counts = packed[: 2 * k + 1].round().long()
    return counts[:k], counts[k : 2 * k], counts[2 * k], packed[-1]
