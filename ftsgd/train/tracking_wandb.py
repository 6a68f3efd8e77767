"""Weights & Biases (``"wandb"`` in ``train.tracking``; ``pip install 'ftsgd[wandb]'``).

W&B's environment variables work as they always do and win over what ftsgd would pass: ``WANDB_PROJECT``
(else ``train.tracking_project``), ``WANDB_ENTITY``, ``WANDB_NAME`` (else the run directory's name),
``WANDB_RUN_GROUP`` (else the sweep's group), ``WANDB_MODE`` (``offline`` logs to local files that
``wandb sync`` uploads later), ``WANDB_DIR`` (where those files go; W&B's default is ``./wandb``),
``WANDB_API_KEY``, ``WANDB_INIT_TIMEOUT`` (ftsgd's default: 30 s, also the most a login prompt waits on a
terminal without an API key).

The run's W&B id is kept in ``tracking.json``; a resumed run continues it (``resume="allow"``). W&B itself
keeps each step once: a step below the run's current one is dropped, so what a killed process logged and
its resumed run logs again shows once. Console capture is off (``console="off"``): the run's own output
stays as it is, on the terminal or in its log file.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ftsgd.train.tracking_base import TrackedRun

__all__ = ["WandbTracker"]

INIT_TIMEOUT_S = 30.0
"""How long ``wandb.init`` may wait for W&B unless ``WANDB_INIT_TIMEOUT`` says otherwise."""


class WandbTracker:
    """One W&B run (a :class:`ftsgd.train.tracking_base.Tracker`)."""

    name: ClassVar[str] = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def open(self, run: TrackedRun) -> int:
        """Start the W&B run with the recipe as its config, or continue the one ``run.saved`` names.

        Returns:
            The last step W&B says the run holds (online, when continuing), else -1: offline, W&B cannot
            tell, so the checkpoint's history is logged again and W&B drops what it has (see above).
        """
        import wandb

        run_id = str(run.saved.get("run_id") or os.environ.get("WANDB_RUN_ID") or _new_id())
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
        self.run = wandb.init(
            project=None if os.environ.get("WANDB_PROJECT") else (run.saved.get("project") or run.project),
            name=None if os.environ.get("WANDB_NAME") else run.name,
            group=None if os.environ.get("WANDB_RUN_GROUP") else (run.group or None),
            tags=[f"{k}={v}"[:64] for k, v in run.tags.items()] or None,  # W&B: <= 64 characters
            config=run.params,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(
                init_timeout=timeout, login_timeout=timeout, console="off", **self._silent(run)
            ),
        )
        if not run.saved.get("run_id"):
            run.remember({"run_id": run_id, "project": self.run.project})
        return int(getattr(self.run, "starting_step", 0) or 0) - 1

    @staticmethod
    def _silent(run: TrackedRun) -> dict[str, bool]:
        """``--quiet`` silences W&B's own messages too, unless ``WANDB_SILENT`` says otherwise."""
        return {"silent": True} if run.quiet and "WANDB_SILENT" not in os.environ else {}

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        """Per-step scalars stay in TensorBoard: W&B gets the epochs, on the same global-step axis."""

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        """Nothing to do: W&B's own process writes and uploads in the background."""

    def finish(self, summary: dict[str, Any], scalars: dict[str, float], files: list[Path]) -> None:
        """The summary's numbers into the run's summary, and the run's files saved with it."""
        self.run.summary.update(scalars)
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if status == "failed" else 0)
            self.run = None


def _new_id() -> str:
    """A new W&B run id: 8 lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
