"""TensorBoard event files, read back with TensorBoard's own reader (``EventAccumulator``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _zygote as zygote
import numpy as np
import pytest
import torch

from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.run.checks import load_checked_recipe
from ftsgd.train.trainer import Trainer

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
STEPS_PER_EPOCH = 6  # 3 classes x 8 images / batch 4
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
    "train.tensorboard=true",
    "train.tensorboard_every=1",
]


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


def test_a_killed_and_resumed_run_logs_each_step_once_with_the_uninterrupted_values(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL half-way through the 4th checkpoint write (step 8): steps 7-8 were logged (the writer is
    flushed before every checkpoint) but the checkpoint on disk is step 6's. The resumed run logs them
    again; TensorBoard's reader must show each step once, equal to the uninterrupted run."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--quiet", "--recipe", "sgd-freeze-embed"]
    for s in SETS:
        args += ["--set", s]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FTSGD_FAULT": "kill_in_write=checkpoint.pt:4:partial",
        "OMP_NUM_THREADS": "1",
    }
    proc = zygote.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["global_step"] == 6
    (first,) = out.glob("events.out.tfevents.*")
    assert [s for s, _ in scalars(first)["train/loss"]] == list(range(1, 9))  # 7 and 8 are orphans

    Trainer(load_recipe(str(out / "recipe.toml")), out, resume=True, quiet=True).fit()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    resumed, uninterrupted = scalars(out), scalars(reference)
    assert resumed.keys() == uninterrupted.keys()
    for tag in resumed:  # timings and memory differ between processes; their steps may not
        same = tag in TIMING or resumed[tag] == uninterrupted[tag]
        assert same and [s for s, _ in resumed[tag]] == [s for s, _ in uninterrupted[tag]], tag


def test_tensorboard_without_the_package_is_a_recipe_error(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a module as not importable
    with pytest.raises(RecipeError) as exc:
        load_checked_recipe("sgd-freeze-embed", [f'data.root="{image_folder}"', "train.tensorboard=true"])
    assert exc.value.exit_code == 2
    (problem,) = exc.value.problems
    assert problem.startswith("train.tensorboard: needs the tensorboard package")
    assert "pip install 'ftsgd[tensorboard]'" in problem
    load_checked_recipe("sgd-freeze-embed", [f'data.root="{image_folder}"'])  # off: nothing needed


def test_no_event_files_unless_asked(image_folder: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        "sgd-freeze-embed",
        [*SETS[:-2], f'data.root="{image_folder}"', "train.epochs=1", "train.batch_size=36"],
    )
    Trainer(recipe, tmp_path / "run", quiet=True).fit()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
