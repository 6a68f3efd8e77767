"""A recipe's ``[[stage]]`` tables as a plan over epochs: which stage trains an epoch, at what rate.

A staged recipe (e.g. LP-FT: a linear probe, then fine-tuning) trains each stage's epochs in turn,
each with its own freeze, optimizer and schedule counted from its own first epoch. Only the last
stage's epochs compete for the exported weights, since the earlier ones prepare the model it
fine-tunes. Everything here is a pure function of the recipe and the epoch, so a resumed run is in
the same stage at the same rate as an uninterrupted one. A recipe without ``[[stage]]`` tables is one
stage, the recipe itself.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftsgd.model.optim import lr_at
from ftsgd.model.prepare import PreparedModel
from ftsgd.recipe.schema import Recipe, stage_label, stage_recipes

__all__ = ["Stages"]


@dataclass(frozen=True)
class Stages:
    """What each stage trains with, and the epochs it spans.

    Attributes:
        recipe: The whole recipe (its ``stages`` are the ``[[stage]]`` tables).
        recipes: Each stage's effective recipe, in order (the recipe itself when it has no stages).
        starts: Each stage's first epoch (0-based), then the total number of epochs.
    """

    recipe: Recipe
    recipes: tuple[Recipe, ...]
    starts: tuple[int, ...]

    @classmethod
    def plan(cls, recipe: Recipe) -> Stages:
        """The stages of ``recipe``, each starting where the one before it ends."""
        recipes = tuple(stage_recipes(recipe))
        starts = tuple(itertools.accumulate((s.train.epochs for s in recipes), initial=0))
        return cls(recipe, recipes, starts)

    @property
    def total_epochs(self) -> int:
        return self.starts[-1]

    @property
    def last_start(self) -> int:
        """The last stage's first epoch (0-based): its epochs, and only they, compete for the export."""
        return self.starts[-2]

    def at(self, epoch: int) -> int:
        """The stage (0-based) that trains ``epoch`` (0-based; past the end: the last stage)."""
        return min(bisect.bisect_right(self.starts, epoch) - 1, len(self.recipes) - 1)

    def lr(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The learning rate at ``step`` of ``epoch``: its stage's schedule, from the stage's first epoch."""
        index = self.at(epoch)
        stage = self.recipes[index]
        return lr_at(
            stage.schedule,
            stage.optim.lr,
            epochs=stage.train.epochs,
            steps_per_epoch=steps_per_epoch,
            epoch=epoch - self.starts[index],
            step=step,
        )

    def message(self, index: int, prepared: PreparedModel) -> str:
        """The line printed as stage ``index`` starts, ``prepared`` frozen as it freezes."""
        stage, first = self.recipes[index], self.starts[index]
        return (
            f"stage {index + 1}/{len(self.recipes)} ({stage_label(self.recipe, index)}): epochs {first + 1}-"
            f"{first + stage.train.epochs}, freeze.policy {stage.freeze.policy} ({prepared.frozen_params:,} of "
            f"{prepared.total_params:,} parameters frozen), {stage.optim.name} lr {stage.optim.lr:g}, fresh "
            "optimizer state"
        )

    def fields(self, index: int) -> dict[str, Any]:
        """Stage ``index`` in an epoch record (nothing for a recipe without [[stage]] tables)."""
        if not self.recipe.stages:
            return {}
        return {"stage": index + 1, "stage_name": stage_label(self.recipe, index)}

    def summaries(
        self, history: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]
    ) -> list[dict[str, Any]]:
        """Per stage: its epochs, what it trained with, and its best epoch by ``train.select_by``.

        Args:
            history: The run's epoch records.
            value: The ``train.select_by`` value of one record's ``splits``.
        """
        rows = []
        for index, stage in enumerate(self.recipes if self.recipe.stages else []):
            first, last = self.starts[index], self.starts[index + 1]
            sign = 1 if self.recipe.train.select_by.endswith(".loss") else -1  # ties: the earlier epoch
            done = [(sign * value(r["splits"]), r["epoch"]) for r in history[first:last]]
            pick = min(done, default=None)
            rows.append(
                {
                    "stage": index + 1,
                    "name": stage_label(self.recipe, index),
                    "epochs": stage.train.epochs,
                    "first_epoch": first + 1,
                    "last_epoch": last,
                    "freeze_policy": stage.freeze.policy,
                    "optimizer": stage.optim.name,
                    "lr": stage.optim.lr,
                    "best_epoch": pick[1] if pick else None,
                    "best_value": sign * pick[0] if pick else None,
                }
            )
        return rows
