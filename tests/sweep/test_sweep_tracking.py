"""``ftsgd sweep`` tells each run's experiment trackers which sweep it belongs to and which grid point it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftsgd.sweep.jobs import tracking_env
from ftsgd.sweep.plan import SweepOptions, plan_sweep
from ftsgd.train.tracking import GROUP_ENV, TAGS_ENV, TrackedRun


def test_each_run_is_grouped_by_its_sweep_and_tagged_with_its_grid_point(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "birds-sweep"
    opts = SweepOptions(
        data=image_folder,
        out=out,
        recipes=["sgd-freeze-embed"],
        grids=["optim.lr=1e-4,0.01", "train.seed=0"],
        sets=["model.kwargs={img_size=32}"],
        model="test_vit",
    )
    runs = plan_sweep(opts).runs
    envs = [tracking_env(run, out) for run in runs]
    assert [env[GROUP_ENV] for env in envs] == ["birds-sweep", "birds-sweep"]
    assert [json.loads(env[TAGS_ENV]) for env in envs] == [
        {"recipe": "sgd-freeze-embed", "optim.lr": 1e-4, "train.seed": 0},
        {"recipe": "sgd-freeze-embed", "optim.lr": 0.01, "train.seed": 0},
    ]
    # what a tracker makes of them (MLflow tags grid.KEY, W&B tags KEY=VALUE)
    for key, value in envs[1].items():
        monkeypatch.setenv(key, value)
    tracked = TrackedRun(runs[1].path, runs[1].resolved, None)
    assert tracked.name == runs[1].path.name and tracked.group == "birds-sweep"
    assert tracked.tags == {"recipe": "sgd-freeze-embed", "optim.lr": "0.01", "train.seed": "0"}
