"""evaluate(): exact metrics on fixed logits, mode handling, and consistency with a real timm model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftsgd.data.folders import discover_splits
from ftsgd.data.loader import build_loader
from ftsgd.data.transforms import build_transform
from ftsgd.infer.evaluate import evaluate
from ftsgd.recipe.schema import DataConfig

CPU = torch.device("cpu")


class TableModel(nn.Module):
    """Returns ``table[i]`` for an input holding sample index ``i``: fully predetermined logits."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        return self.table[x.long().view(-1)]


def _logits_for(predictions: list[list[int]], num_classes: int) -> torch.Tensor:
    """Logits whose ranking puts ``predictions[i]`` first (then the rest in index order)."""
    table = torch.zeros(len(predictions), num_classes)
    for i, ranked in enumerate(predictions):
        for rank, c in enumerate(ranked):
            table[i, c] = 10.0 - rank
    return table


def _loader(labels: list[int], batch_size: int = 3) -> DataLoader:
    indices = torch.arange(len(labels), dtype=torch.float32)
    return DataLoader(TensorDataset(indices, torch.tensor(labels)), batch_size=batch_size)


def test_exact_metrics_with_top5_and_empty_class() -> None:
    names = ["a", "b", "c", "d", "e", "f", "g"]  # 7 classes: top5 reported
    labels = [0, 0, 1, 1, 1, 2, 3, 5]  # class e (4) and g (6) have no samples
    predictions = [
        [0],  # correct
        [1, 2, 3, 4, 5],  # wrong, not in top5 (label 0)
        [1],  # correct
        [0, 1],  # wrong, top5 hit
        [6, 5, 4, 3, 2],  # wrong, top5 miss (label 1)
        [2],  # correct
        [0, 3],  # wrong, top5 hit
        [5],  # correct
    ]
    table = _logits_for(predictions, len(names))
    model = TableModel(table).train()
    results = evaluate(model, _loader(labels), device=CPU, class_names=names)

    assert results["n"] == 8
    assert results["accuracy"] == 4 / 8
    assert results["top5"] == 6 / 8
    expected_loss = F.cross_entropy(table, torch.tensor(labels)).item()
    assert math.isclose(results["loss"], expected_loss, rel_tol=1e-6)
    accuracy_n = {name: (pc["accuracy"], pc["n"]) for name, pc in results["per_class"].items()}
    assert accuracy_n == {
        "a": (0.5, 2),
        "b": (1 / 3, 3),
        "c": (1.0, 1),
        "d": (0.0, 1),
        "e": (None, 0),
        "f": (1.0, 1),
        "g": (None, 0),
    }

    # predicted [0, 1, 1, 0, 6, 2, 0, 5] for labels [0, 0, 1, 1, 1, 2, 3, 5], counted by hand: a is
    # predicted 3 times (1 right), b twice (1 right), g once (wrongly) though the split has none
    def rounded(*values: float | None) -> tuple[float | None, ...]:
        return tuple(None if v is None else round(v, 12) for v in values)

    prf = {
        name: rounded(pc["precision"], pc["recall"], pc["f1"], pc["support"])
        for name, pc in results["per_class"].items()
    }
    assert prf == {
        "a": rounded(1 / 3, 1 / 2, 0.4, 2),
        "b": rounded(1 / 2, 1 / 3, 0.4, 3),
        "c": rounded(1.0, 1.0, 1.0, 1),
        "d": rounded(0.0, 0.0, 0.0, 1),  # never predicted: precision 0
        "e": rounded(None, None, None, 0),  # neither held nor predicted: no numbers
        "f": rounded(1.0, 1.0, 1.0, 1),
        "g": rounded(0.0, None, 0.0, 0),  # predicted, never held: no recall, F1 0
    }
    assert results["macro_f1"] == pytest.approx(2.8 / 6)  # over a, b, c, d, f, g
    assert results["balanced_accuracy"] == pytest.approx(
        (1 / 2 + 1 / 3 + 1 + 0 + 1) / 5
    )  # over a, b, c, d, f
    assert model.modes_seen and not any(model.modes_seen)  # ran in eval mode
    assert model.training  # ... and was put back into training mode


def test_no_top5_with_five_classes_and_eval_mode_kept() -> None:
    names = ["a", "b", "c", "d", "e"]
    model = TableModel(_logits_for([[0], [0], [4]], 5)).eval()
    results = evaluate(model, _loader([0, 1, 4], batch_size=2), device=CPU, class_names=names)
    assert "top5" not in results
    assert results["accuracy"] == 2 / 3
    assert results["per_class"]["b"]["accuracy"] == 0.0
    assert results["per_class"]["b"]["n"] == 1
    assert not model.training


def test_tuple_outputs_use_the_first_element() -> None:
    class Wrapped(TableModel):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return super().forward(x), torch.zeros(1)

    model = Wrapped(_logits_for([[1], [1]], 2))
    assert evaluate(model, _loader([1, 0]), device=CPU, class_names=["x", "y"])["accuracy"] == 0.5


def test_errors() -> None:
    model = TableModel(_logits_for([[0], [1]], 3))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\), expected \(batch, 2\)"):
        evaluate(model, _loader([0, 1]), device=CPU, class_names=["a", "b"])
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(model, _loader([]), device=CPU, class_names=["a", "b", "c"])
    assert model.training  # restored even when evaluation fails


def test_matches_manual_computation_with_timm_model(image_folder: Path) -> None:
    classes, splits = discover_splits(DataConfig(root=str(image_folder)))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(classes))
    data_config = {**timm.data.resolve_model_data_config(model), "input_size": (3, 32, 32)}
    tf = build_transform(data_config, "none", training=False)
    loader = build_loader(splits["ood"], tf, batch_size=10, training=False, seed=0)

    results = evaluate(model, loader, device=CPU, class_names=classes)

    model.eval()
    with torch.no_grad():
        xs, ys = zip(*loader, strict=True)
        logits = model(torch.cat(xs))
    labels = torch.cat(ys)
    assert results["n"] == 24
    assert results["accuracy"] == (logits.argmax(1) == labels).sum().item() / 24
    assert math.isclose(results["loss"], F.cross_entropy(logits, labels).item(), rel_tol=1e-4)
    for k, name in enumerate(classes):
        mask = labels == k
        assert results["per_class"][name]["n"] == 8
        assert results["per_class"][name]["accuracy"] == (logits[mask].argmax(1) == k).sum().item() / 8

    model = model.to(memory_format=torch.channels_last)
    cl = evaluate(
        model, loader, device=CPU, class_names=classes, channels_last=True, amp_dtype=torch.bfloat16
    )
    assert cl["accuracy"] == results["accuracy"]  # amp_dtype is ignored on CPU
    assert math.isclose(cl["loss"], results["loss"], rel_tol=1e-4)


def test_confusion_matrix_counts_true_against_predicted() -> None:
    names = ["a", "b", "c"]
    labels = [0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 2, 1, 1, 0, 0]
    model = TableModel(_logits_for([[p] for p in predicted], 3))
    results = evaluate(model, _loader(labels), device=CPU, class_names=names)
    assert results["confusion"] == [[1, 1, 1], [0, 2, 0], [2, 0, 0]]
    # accuracy and per-class numbers are read off the same matrix
    for i, name in enumerate(names):
        row = results["confusion"][i]
        assert sum(row) == results["per_class"][name]["n"]
        assert row[i] / sum(row) == results["per_class"][name]["accuracy"]
    assert results["accuracy"] == 3 / 7


def test_many_classes_keep_per_class_counts_without_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    import ftsgd.infer.evaluate

    names = ["a", "b", "c"]
    labels = [0, 0, 0, 1, 1, 2, 2]
    model = TableModel(_logits_for([[p] for p in (0, 1, 2, 1, 1, 0, 0)], 3))
    full = evaluate(model, _loader(labels), device=CPU, class_names=names)
    monkeypatch.setattr(ftsgd.infer.evaluate, "CONFUSION_MAX_CLASSES", 2)  # as a 21k-class model would be
    counted = evaluate(model, _loader(labels), device=CPU, class_names=names)
    assert "confusion" not in counted
    assert {k: v for k, v in full.items() if k != "confusion"} == counted
