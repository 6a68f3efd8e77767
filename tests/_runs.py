"""Run directories with known results, written the way ``ftsgd train`` writes them, to pin the selection.

The recipe is the real resolved recipe (``load_recipe`` + ``recipe_to_toml``, the trainer's own writer);
metrics.jsonl and summary.json carry the fields the trainer writes, with chosen accuracies. The best
epoch is deliberately not the last one, so a report reading the final epoch instead would fail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftsgd.recipe.dump import recipe_to_toml
from ftsgd.recipe.load import load_recipe


def _splits(val: float, ood: float | None, delta: float) -> dict[str, Any]:
    splits = {"val": {"accuracy": val - delta, "loss": 1.0, "n": 64}}
    if ood is not None:
        splits["ood"] = {"accuracy": ood + delta, "loss": 2.0, "n": 64}
    return splits


def write_run(
    path: Path,
    *,
    data: Path,
    recipe: str = "sgd-freeze-embed",
    lr: float = 1e-3,
    seed: int = 0,
    val: float = 0.5,
    ood: float | None = 0.4,
    sets: Sequence[str] = (),
    finished: bool = True,
    peak: int = 700 * 2**20,
    seconds: float = 30.0,
) -> Path:
    """A 2-epoch run whose best epoch (1) has ID-val accuracy ``val`` and OOD accuracy ``ood``.

    Epoch 2 has lower val and *higher* OOD accuracy. ``finished=False`` leaves a run stopped after
    epoch 1 (recipe.toml and metrics.jsonl, no summary.json).
    """
    for split in ("train", "val"):  # the recipe checks that its data folders exist
        (data / split).mkdir(parents=True, exist_ok=True)
    resolved = load_recipe(
        recipe,
        [
            'model.name="test_vit"',
            f"optim.lr={lr!r}",
            f"train.seed={seed}",
            "train.epochs=2",
            f"data.root={json.dumps(str(data))}",
            *sets,
        ],
    )
    path.mkdir(parents=True)
    (path / "recipe.toml").write_text(recipe_to_toml(resolved))
    history = [
        {
            "epoch": epoch,
            "step": 10 * epoch,
            "lr": lr,
            "train_loss": 1.5 / epoch,
            "train_accuracy": 0.3 * epoch,
            "splits": _splits(val, ood, 0.0 if epoch == 1 else 0.05),
            "images_per_s": 100.0,
            "epoch_time_s": seconds / 2,
            "peak_memory_bytes": peak - (epoch == 1),
        }
        for epoch in ((1, 2) if finished else (1,))
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if finished:
        summary = {
            "run_dir": str(path),
            "recipe": resolved.name,
            "epochs": 2,
            "steps": 20,
            "best_epoch": 1,
            "val_split": "val",
            "val_accuracy": val,
            "best": history[0]["splits"],
            "final": history[1]["splits"],
            "optimizer": resolved.optim.name,
            "lr": lr,
            "train_time_s": seconds,
            "peak_memory_bytes": peak,
        }
        (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return path
