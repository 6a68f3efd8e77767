"""A selected epoch that predicts one class for nearly every validation image is warned about."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftsgd.infer.evaluate import evaluate
from ftsgd.train.collapse import collapse_warning


def _record(predicted: dict[str, int]) -> dict:
    return {"epoch": 3, "per_class": {"val": {k: {"predicted": v, "n": 5} for k, v in predicted.items()}}}


def test_ninety_percent_of_one_class_is_a_collapse_with_the_counts() -> None:
    message = collapse_warning(_record({"cat": 18, "dog": 2, "owl": 0}))
    assert message is not None
    assert "the selected epoch 3 predicts 'cat' for 18 of 20 val images (90%" in message
    assert "predicted per class: cat 18, dog 2, owl 0" in message
    assert collapse_warning(_record({"cat": 17, "dog": 3})) is None  # 85%
    assert collapse_warning({"epoch": 1, "splits": {}}) is None  # an older run's metrics
    assert collapse_warning(_record({"cat": 5, "dog": 0})) is None  # 5 images prove nothing


def test_evaluation_counts_what_each_class_was_predicted() -> None:
    """A classifier whose bias always wins predicts class 0 for everything: the counts say so."""
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    data = TensorDataset(torch.randn(10, 4), torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0, 2]))
    results = evaluate(
        model, DataLoader(data, batch_size=4), device=torch.device("cpu"), class_names=["a", "b", "c"]
    )
    assert {k: v["predicted"] for k, v in results["per_class"].items()} == {"a": 10, "b": 0, "c": 0}
    message = collapse_warning({"epoch": 1, "per_class": {"val": results["per_class"]}})
    assert message is not None and "predicts 'a' for 10 of 10 val images" in message
