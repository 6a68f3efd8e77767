"""MLflow (``"mlflow"`` in ``train.tracking``; ``pip install 'ftsgd[mlflow]'``, mlflow-skinny is enough).

Through ``mlflow.MlflowClient`` only (no global active run, so nothing leaks into a caller's own MLflow
use): MLflow's environment variables choose the server and experiment as they always do
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``, credentials), and win
over ``train.tracking_project``. The run is named after the run directory and tagged with the sweep it
belongs to and its grid point (``ftsgd.group``, ``grid.KEY``).

Each call is one synchronous request; unless set otherwise, requests are not retried and time out after
10 s (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``), so a server that is down
costs the run one failed request and a warning, not minutes of retries.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ftsgd.train.tracking_base import TrackedRun

__all__ = ["MlflowTracker"]

_QUICK_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's request settings unless the environment sets them (its defaults retry for minutes)."""
_MARKER = "epoch/epoch"
"""The metric every epoch logs: its history says which steps the MLflow run already holds."""
_STATUS = {"finished": "FINISHED", "paused": "KILLED", "failed": "FAILED"}
_BATCH = 1000
"""The most metrics MLflow takes in one ``log_batch`` request."""
_PARAM_LENGTH = 6000
"""The longest parameter value MLflow stores."""


class MlflowTracker:
    """One MLflow run (a :class:`ftsgd.train.tracking_base.Tracker`)."""

    name: ClassVar[str] = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""

    def open(self, run: TrackedRun) -> int:
        """Create the MLflow run with the recipe as parameters, or continue the one ``run.saved`` names."""
        for key, value in _QUICK_FAILURE.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.client = MlflowClient()
        if run.saved.get("run_id"):
            self.run_id = str(run.saved["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, _MARKER)
            return max((m.step for m in history), default=-1)
        tags = {"ftsgd.run_dir": str(run.path)} | {f"grid.{k}": v for k, v in run.tags.items()}
        if run.group:
            tags["ftsgd.group"] = run.group
        created = self.client.create_run(self._experiment_id(run.project), run_name=run.name, tags=tags)
        self.run_id = created.info.run_id
        run.remember({"run_id": self.run_id, "experiment_id": created.info.experiment_id})
        self._log_params(run.params)
        return -1

    def _experiment_id(self, project: str) -> str:
        """``MLFLOW_EXPERIMENT_ID``, else the experiment named ``MLFLOW_EXPERIMENT_NAME`` or ``project``
        (created when missing)."""
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or project
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from ftsgd.recipe.values import toml_value

        text = {
            k: v if isinstance(v, str) else toml_value(v) for k, v in params.items()
        }  # TOML, strings bare
        items = [Param(k, v[:_PARAM_LENGTH]) for k, v in text.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per request
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def step(self, global_step: int, loss: float, accuracy: float, lr: float) -> None:
        """Per-step scalars stay in TensorBoard: one request per step would slow training down."""

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        self._log_metrics(step, scalars)

    def _log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step) for k, v in scalars.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH])

    def flush(self) -> None:
        """Nothing: every request was answered before it returned."""

    def finish(self, summary: dict[str, Any], scalars: dict[str, float], files: list[Path]) -> None:
        """The summary's numbers as metrics at the last step, and the run's files as artifacts."""
        self._log_metrics(int(summary.get("steps") or 0), scalars)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FINISHED"))
        self.client = None
