"""Metrics beyond accuracy, from the counts of a confusion matrix, and aggregates over evaluation splits.

One function computes them (:func:`metrics_from_counts`), from each class's true positives, images
(support) and predictions, which are a confusion matrix's diagonal, row sums and column sums
(:func:`confusion_metrics`): ``ftsgd train`` (every epoch), ``ftsgd eval`` and the report therefore
agree on every number. The definitions are scikit-learn's:

- precision = TP / predicted, recall = TP / support, F1 their harmonic mean; a class never predicted has
  precision 0, a class with no images in the split has no recall (``None``), and a class the split
  neither holds nor predicts has no numbers at all;
- ``macro_f1``: the mean F1 over the classes the split holds or the model predicts;
- ``balanced_accuracy``: the mean recall over the classes the split holds.

Accuracy alone hides a class the model never predicts: on a 90/10 split, always answering the big class
scores 90% accuracy but 50% balanced accuracy and a macro-F1 of about 0.47.

Pure Python (no torch), so ``ftsgd report`` can use the aggregates without loading it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AGGREGATED",
    "AGGREGATE_SPLITS",
    "aggregate_splits",
    "confusion_metrics",
    "metrics_from_counts",
    "selection_value",
]

AGGREGATE_SPLITS = ("worst", "mean")
"""Their names, recorded like splits (``worst.accuracy``); :data:`ftsgd.recipe.schema.AGGREGATE_SPLITS`."""

AGGREGATED = ("accuracy", "top5", "macro_f1", "balanced_accuracy", "loss")
"""The metrics aggregated over splits into ``worst`` and ``mean`` (``loss``: worst is the largest)."""


def metrics_from_counts(
    tp: Sequence[int], support: Sequence[int], predicted: Sequence[int], class_names: Sequence[str]
) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, with macro-F1 and balanced accuracy.

    Args:
        tp: Per class, the images of that class predicted as it.
        support: Per class, the images of that class.
        predicted: Per class, the images predicted as that class.
        class_names: The classes, in the same order.

    Returns:
        ``{"macro_f1", "balanced_accuracy", "per_class": {name: {"precision", "recall", "f1", "support"}}}``;
        a value is ``None`` where it is undefined (see the module docstring).
    """
    per_class: dict[str, dict[str, Any]] = {}
    f1s: list[float] = []
    recalls: list[float] = []
    for name, hits, n, guessed in zip(class_names, tp, support, predicted, strict=True):
        recall = hits / n if n else None
        precision = hits / guessed if guessed else (0.0 if n else None)
        f1 = None
        if n or guessed:
            p, r = precision or 0.0, recall or 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            f1s.append(f1)
        if recall is not None:
            recalls.append(recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": n}
    return {
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else None,
        "per_class": per_class,
    }


def confusion_metrics(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> dict[str, Any]:
    """:func:`metrics_from_counts` of a confusion matrix (rows: true class, columns: predicted class)."""
    k = len(confusion)
    tp = [confusion[i][i] for i in range(k)]
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[i][j] for i in range(k)) for j in range(k)]
    return metrics_from_counts(tp, support, predicted, class_names)


def aggregate_splits(
    results: Mapping[str, Mapping[str, Any]], val: str = "val", *, minimum: int = 2
) -> dict[str, dict[str, float]]:
    """``worst`` and ``mean`` over the evaluation splits other than ``val``, recorded like splits.

    ``worst`` is each metric's minimum over those splits (the largest ``loss``), ``mean`` their unweighted
    mean (every split counts alike, whatever its size), as distribution-shift benchmarks report worst-group
    and average accuracy. A metric is aggregated only when every such split has it.

    Args:
        results: Each split's metrics (aggregates already in it are left out of the new ones).
        val: The ID-validation split's name.
        minimum: Splits besides val needed. Runs record the aggregates over two or more (over one they
            repeat it); selecting by one with a single such split takes that split (``minimum=1``).

    Returns:
        ``{"worst": {...}, "mean": {...}}``, or ``{}`` with fewer than ``minimum`` splits besides ``val``.
    """
    others = [r for name, r in results.items() if name not in (val, *AGGREGATE_SPLITS)]
    if len(others) < max(minimum, 1):
        return {}
    worst: dict[str, float] = {}
    mean: dict[str, float] = {}
    for metric in AGGREGATED:
        values = [r.get(metric) for r in others]
        if any(v is None for v in values):
            continue
        numbers = [float(v) for v in values if v is not None]
        worst[metric] = max(numbers) if metric == "loss" else min(numbers)
        mean[metric] = sum(numbers) / len(numbers)
    return {"worst": worst, "mean": mean}


def selection_value(
    splits: Mapping[str, Mapping[str, Any]], split: str, metric: str, val: str = "val"
) -> Any:
    """``splits[split][metric]``, where ``split`` may be an aggregate a record left out (one split besides val).

    Raises:
        KeyError: The split or metric is not in the record.
    """
    if split in AGGREGATE_SPLITS and split not in splits:
        splits = aggregate_splits(splits, val, minimum=1)
    return splits[split][metric]
