"""A selected epoch that predicts one class for nearly every validation image.

A run that collapsed to the majority class can still have the best validation accuracy of its epochs (on a
skewed validation split, often a good one) and is then exported as if it had learned something. Accuracy does
not show it; the predictions' class counts do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLLAPSE_SHARE", "collapse_warning"]

COLLAPSE_SHARE = 0.9
"""Share of a split's images predicted as one class from which the selected epoch is called collapsed."""
MIN_IMAGES = 10
"""Below this many images a split says too little to call anything a collapse (2 of 2 is no evidence)."""


def collapse_warning(record: dict[str, Any], split: str = "val") -> str | None:
    """The warning for epoch ``record`` when it predicts one class for >= 90% of ``split``'s images (of at
    least :data:`MIN_IMAGES`), else None."""
    per_class = record.get("per_class", {}).get(split)
    if not per_class or any("predicted" not in c for c in per_class.values()):
        return None  # an older run's metrics, or a split too large for per-class counts
    predicted = {name: int(c["predicted"]) for name, c in per_class.items()}
    total = sum(predicted.values())
    top = max(predicted, key=lambda name: predicted[name])
    if total < MIN_IMAGES or len(predicted) < 2 or predicted[top] < COLLAPSE_SHARE * total:
        return None
    counts = ", ".join(f"{name} {n}" for name, n in sorted(predicted.items(), key=lambda kv: -kv[1]))
    return (
        f"the selected epoch {record['epoch']} predicts {top!r} for {predicted[top]} of {total} {split} images "
        f"({100 * predicted[top] / total:.0f}%; predicted per class: {counts}): the model may have collapsed to "
        "one class. Check the class balance (train.class_weights, data.sampler) and the learning rate"
    )
