"""Experiment tracking, read back with each tracker's own reader: TensorBoard's ``EventAccumulator``, MLflow's
``MlflowClient`` on a local ``file:`` store, and W&B's offline transaction log (``run-ID.wandb``).

One tiny run logs to all three at once (``reference``), and one killed and resumed run does too, so the
three trackers share two trainings and one subprocess.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _zygote as zygote
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.run.checks import load_checked_recipe
from ftsgd.train.trainer import Trainer

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator
MlflowClient = pytest.importorskip("mlflow").MlflowClient
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "trackers_offline")

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
STEPS_PER_EPOCH = 6  # 3 classes x 8 images / batch 4
EPOCH_STEPS = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
TIMING = ("epoch/images_per_s", "epoch/epoch_time_s", "epoch/peak_memory_bytes")
SETS = [
    'model.name="test_vit"',
    "model.kwargs={img_size=32}",
    "data.num_workers=0",
    'data.augment="rrc_flip"',
    "train.batch_size=4",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "optim.lr=0.02",
    'train.tracking=["tensorboard", "mlflow", "wandb"]',
    "train.tensorboard_every=1",
]
GROUP, TAGS = "sweep-a", {"optim.lr": 0.02, "train.seed": 0}


@pytest.fixture(scope="module")
def trackers_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MLflow on a local file store and W&B offline, both under one folder; the runs grouped and tagged as
    ``ftsgd sweep`` does. In the environment, so the test's subprocesses log there too."""
    folder = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database, mlflow-skinny has none
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "WANDB_PROJECT", "WANDB_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(folder))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("FTSGD_TRACKING_GROUP", GROUP)
        mp.setenv("FTSGD_TRACKING_TAGS", json.dumps(TAGS))
        yield folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracking") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 8, "val": 2, "ood": 2})


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    out = data.parent / "reference"
    Trainer(load_recipe("sgd-freeze-embed", [*SETS, f'data.root="{data}"']), out, quiet=True).fit()
    return out


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's ``(step, value)`` pairs as TensorBoard shows them (orphaned steps purged)."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(value: float) -> float:
    """How an event file stores a scalar."""
    return float(np.float32(value))


@pytest.mark.slow
def test_event_files_hold_the_metrics_and_the_recipe(reference: Path) -> None:
    found = scalars(reference)
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for tag in ("train/loss", "train/accuracy", "train/lr"):
        assert [s for s, _ in found[tag]] == steps, tag
    assert all(0 <= v <= 1 for _, v in found["train/accuracy"])
    assert [v for _, v in found["train/lr"]] == [f32(0.02)] * 6 + [f32(0.01)] * 6  # cosine per epoch

    history = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        values = {f"epoch/{k}": record[k] for k in ("train_loss", "train_accuracy", "lr", "images_per_s")}
        values |= {f"epoch/{k}": record[k] for k in ("epoch_time_s", "peak_memory_bytes", "epoch")}
        for split in ("val", "ood"):
            values |= {f"{split}/{m}": record["splits"][split][m] for m in ("accuracy", "loss")}
        for tag, value in values.items():
            expected.setdefault(tag, []).append((record["step"], f32(value)))
    assert [r["step"] for r in history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for tag, points in expected.items():
        assert found[tag] == points, tag

    acc = EventAccumulator(str(reference), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("recipe/text_summary")
    recipe_toml = (reference / "recipe.toml").read_text()
    assert text.tensor_proto.string_val[0].decode() == f"```toml\n{recipe_toml}```"


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ids(run: Path, tracker: str) -> str:
    return json.loads((run / "tracking.json").read_text())[tracker]["run_id"]


def mlflow_metrics(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's ``(step, value)`` history of an MLflow run, in step order."""
    client = MlflowClient()
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB's log format,
    32 KiB blocks of chunks, each ``crc32, length, type`` (1 whole, 2 first, 3 middle, 4 last) and data."""
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def key(item: Any) -> str:
    """A W&B history or summary item's name (``val/accuracy`` comes as the nested key ``val``, ``accuracy``)."""
    return item.key or "/".join(item.nested_key)


def wandb_segments(folder: Path, run_id: str) -> list[dict[str, Any]]:
    """Each offline segment of W&B run ``run_id`` (one per process that logged it), oldest first: its run
    record, config, history (step -> values), summary and saved files."""
    segments = []
    for run_dir in sorted(folder.glob(f"wandb/offline-run-*-{run_id}")):
        seg: dict[str, Any] = {
            "history": {},
            "summary": {},
            "files": {p.name for p in run_dir.glob("files/*")},
        }
        for record in wandb_records(run_dir / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                seg["run"] = record.run
                seg["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                values = {key(i): json.loads(i.value_json) for i in record.history.item}
                assert record.history.step.num not in seg["history"]  # one value per step
                seg["history"][record.history.step.num] = values
            elif kind == "summary":
                seg["summary"] |= {key(i): json.loads(i.value_json) for i in record.summary.update}
        segments.append(seg)
    return segments


@pytest.mark.slow
def test_mlflow_holds_the_recipe_the_epochs_the_summary_and_the_files(reference: Path) -> None:
    run_id = ids(reference, "mlflow")
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "reference" and run.info.status == "FINISHED"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "ftsgd"  # train.tracking_project
    params = run.data.params
    assert (
        params["optim.lr"] == "0.02" and params["model.name"] == "test_vit" and params["train.epochs"] == "2"
    )
    assert params["model.kwargs"] == "{ img_size = 32 }"
    assert run.data.tags["ftsgd.group"] == GROUP and run.data.tags["grid.optim.lr"] == "0.02"

    metrics = mlflow_metrics(run_id)
    records = history(reference)
    for key in ("val/accuracy", "val/loss", "ood/accuracy", "epoch/train_loss", "epoch/lr", *TIMING):
        split, _, name = key.partition("/")
        expected = [(r["step"], r[name] if split == "epoch" else r["splits"][split][name]) for r in records]
        assert metrics[key] == expected, key
    summary = json.loads((reference / "summary.json").read_text())
    assert metrics["best/epoch"] == [(EPOCH_STEPS[-1], summary["best_epoch"])]
    assert metrics["best/val/accuracy"] == [(EPOCH_STEPS[-1], summary["best"]["val"]["accuracy"])]
    artifacts = {f.path for f in MlflowClient().list_artifacts(run_id)}
    assert {"model.safetensors", "config.json", "summary.json", "recipe.toml"} <= artifacts


@pytest.mark.slow
def test_wandb_offline_holds_the_recipe_the_epochs_the_summary_and_the_files(
    reference: Path, trackers_offline: Path
) -> None:
    (seg,) = wandb_segments(trackers_offline, ids(reference, "wandb"))
    assert (seg["run"].display_name, seg["run"].project, seg["run"].run_group) == (
        "reference",
        "ftsgd",
        GROUP,
    )
    assert sorted(seg["run"].tags) == ["optim.lr=0.02", "train.seed=0"]
    assert seg["config"]["optim.lr"] == 0.02 and seg["config"]["model.kwargs"] == {"img_size": 32}
    records = history(reference)
    assert sorted(seg["history"]) == EPOCH_STEPS
    for r in records:
        logged = seg["history"][r["step"]]
        assert logged["val/accuracy"] == r["splits"]["val"]["accuracy"] and logged["epoch/lr"] == r["lr"]
        assert logged["epoch/peak_memory_bytes"] == r["peak_memory_bytes"]
    summary = json.loads((reference / "summary.json").read_text())
    assert seg["summary"]["best/val/accuracy"] == summary["best"]["val"]["accuracy"]
    assert {"model.safetensors", "config.json", "summary.json", "recipe.toml"} <= seg["files"]


@pytest.mark.slow
def test_a_killed_and_resumed_run_logs_each_step_once_with_the_uninterrupted_values(
    data: Path, reference: Path, tmp_path: Path, trackers_offline: Path
) -> None:
    """SIGKILL half-way through the 3rd checkpoint write, the one at the end of epoch 1 (step 6): the
    trackers hold epoch 1 and steps 5-6 (they log, and TensorBoard is flushed, before every checkpoint),
    but the checkpoint on disk is step 4's. The resumed run trains steps 5-6 again; every tracker must
    show one run with each step once, equal to the uninterrupted run."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--quiet", "--recipe", "sgd-freeze-embed"]
    for s in SETS:
        args += ["--set", s]
    env = {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # W&B's process of its own, not ours
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FTSGD_FAULT": "kill_in_write=checkpoint.pt:3:partial",
        "OMP_NUM_THREADS": "1",
    }
    proc = zygote.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 4
    (first,) = out.glob("events.out.tfevents.*")
    assert [s for s, _ in scalars(first)["train/loss"]] == list(range(1, 7))  # 5 and 6 are orphans
    mlflow_id, wandb_id = ids(out, "mlflow"), ids(out, "wandb")
    assert [s for s, _ in mlflow_metrics(mlflow_id)["val/accuracy"]] == EPOCH_STEPS[:1]

    Trainer(load_recipe(str(out / "recipe.toml")), out, resume=True, quiet=True).fit()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    resumed, uninterrupted = scalars(out), scalars(reference)
    assert resumed.keys() == uninterrupted.keys()
    for tag in resumed:  # timings and memory differ between processes; their steps may not
        same = tag in TIMING or resumed[tag] == uninterrupted[tag]
        assert same and [s for s, _ in resumed[tag]] == [s for s, _ in uninterrupted[tag]], tag

    assert (ids(out, "mlflow"), ids(out, "wandb")) == (mlflow_id, wandb_id)  # the same tracker runs
    runs = MlflowClient().search_runs(
        [MlflowClient().get_run(mlflow_id).info.experiment_id], "attributes.run_name = 'run'"
    )
    assert [r.info.run_id for r in runs] == [mlflow_id] and runs[0].info.status == "FINISHED"
    expected = mlflow_metrics(ids(reference, "mlflow"))
    for key, points in mlflow_metrics(mlflow_id).items():
        assert [s for s, _ in points] == [s for s, _ in expected[key]], key  # each step once
        assert key in (*TIMING, "train_time_s", "peak_memory_bytes") or points == expected[key], key

    segments = wandb_segments(trackers_offline, wandb_id)
    _killed, last = segments  # W&B keeps each step's first value; every segment holds the same ones
    assert sorted(last["history"]) == EPOCH_STEPS
    final = {r["step"]: r["splits"]["val"]["accuracy"] for r in history(reference)}
    for seg in segments:
        assert {step: v["val/accuracy"] for step, v in seg["history"].items()}.items() <= final.items()


def test_an_unreachable_tracker_warns_once_and_the_run_finishes(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLflow server that refuses connections: one warning, the run trains on and exits 0, quickly (MLflow's
    own default would retry for minutes)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--quiet",
        "--recipe",
        "sgd-freeze-embed",
    ]
    for s in [*SETS[:-2], "train.tracking=mlflow", "train.epochs=1", "train.batch_size=36"]:
        args += ["--set", s]
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 60
    assert result.stderr.count("warning: train.tracking: mlflow failed") == 1, result.stderr
    assert (out / "summary.json").is_file() and not (out / "tracking.json").exists()
    assert not list(out.glob("events.out.tfevents.*"))  # TensorBoard only when asked


@pytest.mark.parametrize(
    ("tracker", "package"), [("mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard")]
)
def test_a_tracker_without_its_package_is_a_recipe_error(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch, tracker: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # how Python marks a module as not importable
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe("sgd-freeze-embed", [f'data.root="{image_folder}"', f"train.tracking={tracker}"])
    assert exc.value.exit_code == 2
    (problem,) = exc.value.problems
    assert problem.startswith(f"train.tracking: '{tracker}' needs the {package} package")
    assert f"pip install 'ftsgd[{tracker}]'" in problem
    load_checked_recipe("sgd-freeze-embed", [f'data.root="{image_folder}"'])  # off: nothing needed


def test_an_unknown_tracker_is_refused_before_any_work(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--out", str(out), "--model", "test_vit"]
    result = CliRunner().invoke(app, [*args, "--set", "train.tracking=tensorboard,mlfow"])
    assert result.exit_code == 2 and not out.exists()
    assert "train.tracking: unknown value 'mlfow'; did you mean 'mlflow'?" in result.stderr
