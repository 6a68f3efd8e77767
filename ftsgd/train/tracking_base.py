"""What every experiment tracker gets and does: :class:`TrackedRun` and the :class:`Tracker` protocol.

Apart from :mod:`.tracking` (which fans the Trainer's calls out to the trackers) so that each tracker's module
can name these types without importing the module that imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ftsgd.recipe.dump import flatten_recipe, recipe_to_dict, recipe_to_toml
from ftsgd.recipe.schema import Recipe

__all__ = ["GROUP_ENV", "TAGS_ENV", "TrackedRun", "Tracker"]

GROUP_ENV = "FTSGD_TRACKING_GROUP"
"""Environment variable naming the group a run belongs to (``ftsgd sweep`` sets it to the sweep's folder name)."""
TAGS_ENV = "FTSGD_TRACKING_TAGS"
"""Environment variable with a JSON object of tags for the run (``ftsgd sweep``: the run's grid point)."""


@dataclass
class TrackedRun:
    """What a tracker needs to start or continue the run it logs."""

    path: Path
    """The run directory (its name is the tracker run's name)."""
    recipe: Recipe
    resume_step: int | None
    """The checkpoint's global step when resuming (None: a new run)."""
    saved: dict[str, Any] = field(default_factory=dict)
    """What this tracker kept in ``tracking.json`` last time (its run id), empty for a new tracker run."""
    remember: Any = None
    """``remember(dict)`` keeps the tracker's ids in ``tracking.json`` (atomically)."""
    quiet: bool = False
    """The run prints nothing but warnings (``--quiet``); a tracker's own messages too."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def project(self) -> str:
        return self.recipe.train.tracking_project

    @property
    def params(self) -> dict[str, Any]:
        """The resolved recipe, flattened to ``section.key`` names (stages as ``stage.N.section.key``)."""
        return flatten_recipe(recipe_to_dict(self.recipe))

    @property
    def recipe_toml(self) -> str:
        return recipe_to_toml(self.recipe)

    @property
    def group(self) -> str:
        return os.environ.get(GROUP_ENV, "")

    @property
    def tags(self) -> dict[str, str]:
        """``FTSGD_TRACKING_TAGS`` (a JSON object) as strings; anything unreadable is no tags."""
        try:
            tags = json.loads(os.environ.get(TAGS_ENV, "") or "{}")
        except json.JSONDecodeError:
            return {}
        return (
            {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()}
            if isinstance(tags, dict)
            else {}
        )


class Tracker(Protocol):
    """One experiment tracker. Any exception it raises turns it off for the rest of the run (one warning)."""

    name: ClassVar[str]

    def open(self, run: TrackedRun) -> int:
        """Start the tracker run, or continue the one ``run.saved`` names.

        Returns:
            The last global step whose epoch the tracker already holds (-1: none).
        """
        ...

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        """One optimizer step's train loss, accuracy and learning rate (trackers may ignore it)."""
        ...

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        """One epoch's :func:`epoch_scalars`, at the epoch's last global step."""
        ...

    def flush(self) -> None:
        """Make what was logged durable (before each checkpoint)."""
        ...

    def finish(self, summary: dict[str, Any], scalars: dict[str, float], files: list[Path]) -> None:
        """The run's end: its summary (and :func:`summary_scalars`) and its files."""
        ...

    def close(self, status: str) -> None:
        """Stop logging: ``finished``, ``paused`` (``--max-steps`` or a signal; resumable) or ``failed``."""
        ...
