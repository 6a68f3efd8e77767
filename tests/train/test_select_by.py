"""``train.select_by`` picks the exported epoch, ``train.patience`` stops early; both survive a resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.cli.evaluate import eval_command
from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS_PER_EPOCH = 3  # 3 classes x 8 images / batch 8
TIMING = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
SETS = [
    'model.name="test_vit"',
    "model.kwargs={img_size=32}",
    "data.num_workers=0",
    'data.augment="flip"',
    "train.batch_size=8",
    "optim.lr=0.05",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selection") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 8, "val": 4, "ood": 4})


def recipe_for(data: Path, *extra: str):
    return load_recipe("sgd-freeze-embed", [*SETS, f'data.root="{data}"', *extra])


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_select_by_another_splits_loss_picks_and_exports_that_epoch(data: Path, tmp_path: Path) -> None:
    """The paper's OOD-oracle ablation: the epoch with the lowest ood loss is the one exported."""
    out = tmp_path / "run"
    summary = Trainer(recipe_for(data, "train.epochs=6", 'train.select_by="ood.loss"'), out, quiet=True).fit()
    records = history(out)
    losses = [r["splits"]["ood"]["loss"] for r in records]
    best = losses.index(min(losses))
    assert summary["best_epoch"] == best + 1 and summary["select_by"] == "ood.loss"
    assert summary["best_value"] == min(losses)
    assert summary["best"] == records[best]["splits"]
    assert summary["val_accuracy"] == records[best]["splits"]["val"]["accuracy"]
    assert summary["stopped_early"] is False and summary["stop_epoch"] is None
    accuracy_best = max(range(6), key=lambda i: (records[i]["splits"]["val"]["accuracy"], -i))
    assert best not in (5, accuracy_best), (
        "a setting where ood.loss picks neither the last nor val's best epoch"
    )
    # the exported weights are that epoch's: evaluating them gives its ood loss again
    again = eval_command(out, data, splits=["ood"], num_workers=0)["ood"]
    assert again["loss"] == pytest.approx(min(losses), rel=1e-5)


@pytest.mark.slow
def test_patience_stops_early_and_a_resumed_run_stops_at_the_same_epoch(data: Path, tmp_path: Path) -> None:
    """Mixup, CutMix and the EMA on too: resumed mid-epoch twice, the run ends bit for bit as the uninterrupted one."""
    extra = (
        "train.epochs=6",
        "train.patience=2",
        'train.select_by="ood.accuracy"',
        "data.mixup=0.8",
        "data.cutmix=1.0",
        "train.ema_decay=0.5",
    )
    full = tmp_path / "full"
    summary = Trainer(recipe_for(data, *extra), full, quiet=True).fit()
    records = history(full)
    assert summary["stopped_early"] is True, "the setting must stop early for this test to mean anything"
    stop = summary["stop_epoch"]
    assert len(records) == stop < 6 and stop - summary["best_epoch"] == 2
    values = [r["splits"]["ood"]["accuracy"] for r in records]
    assert summary["best_value"] == max(values) == values[summary["best_epoch"] - 1]
    assert all(v <= summary["best_value"] for v in values[summary["best_epoch"] :])

    part = tmp_path / "part"
    for limit in (2, 2 * STEPS_PER_EPOCH + 1):  # mid-epoch 1, then mid-epoch 3
        resume = part.exists()
        recipe = load_recipe(str(part / "recipe.toml")) if resume else recipe_for(data, *extra)
        assert Trainer(recipe, part, quiet=True, resume=resume, max_steps=limit).fit() is None
    resumed = Trainer(load_recipe(str(part / "recipe.toml")), part, quiet=True, resume=True).fit()

    for key in ("best_epoch", "stop_epoch", "best_value", "stopped_early", "steps", "best"):
        assert resumed[key] == summary[key], key
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in history(part)] == strip
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(full / "checkpoint.pt", weights_only=True)
    cb = torch.load(part / "checkpoint.pt", weights_only=True)
    for section in ("model", "ema"):
        assert all(torch.equal(ca[section][k], cb[section][k]) for k in ca[section]), section

    # a finished run resumed again (say its summary.json was lost) trains nothing more
    (part / "summary.json").unlink()
    again = Trainer(load_recipe(str(part / "recipe.toml")), part, quiet=True, resume=True).fit()
    assert again["steps"] == summary["steps"] and again["stop_epoch"] == stop


def test_a_run_directory_from_before_these_keys_resumes(data: Path, tmp_path: Path) -> None:
    """recipe.toml and checkpoint.pt written before select_by/patience/EMA/mixup existed still resume."""
    out = tmp_path / "run"
    assert Trainer(recipe_for(data, "train.epochs=2"), out, quiet=True, max_steps=4).fit() is None
    new_keys = (
        r"^(select_by|patience|ema_decay|ema_warmup|tensorboard|tensorboard_every|mixup\w*|cutmix|drop_\w+) ="
    )
    old_toml = "\n".join(
        line for line in (out / "recipe.toml").read_text().splitlines() if not re.match(new_keys, line)
    )
    (out / "recipe.toml").write_text(old_toml + "\n")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) == {"format", "model", "optimizer", "scaler", "state", "rng", "amp"}
    del checkpoint["amp"]  # nor did it record its precision (tests/train/test_precision.py: which it takes)
    torch.save(checkpoint, out / "checkpoint.pt")
    summary = Trainer(load_recipe(str(out / "recipe.toml")), out, quiet=True, resume=True).fit()
    assert summary["select_by"] == "val.accuracy" and summary["steps"] == 2 * STEPS_PER_EPOCH


def test_select_by_and_patience_are_checked_in_the_recipe() -> None:
    for value, text in (
        ("val.acc", "expected SPLIT.METRIC with METRIC one of accuracy, loss, macro_f1, balanced_accuracy"),
        ("accuracy", "expected SPLIT.METRIC"),
        ("train.loss", "the training split is not evaluated each epoch"),
    ):
        with pytest.raises(RecipeError) as exc:
            load_recipe("sgd", [f'train.select_by="{value}"', "train.patience=-1"])
        assert any(p.startswith("train.select_by: ") and text in p for p in exc.value.problems), value
        assert "train.patience: must be >= 0 (0 = off), got -1" in exc.value.problems
    assert load_recipe("sgd", ['train.select_by="ood.v2.loss"']).train.select_by == "ood.v2.loss"


def test_select_by_a_split_the_data_lacks_is_exit_2_before_the_model_is_built(
    data: Path, tmp_path: Path
) -> None:
    trainer = Trainer(recipe_for(data, 'train.select_by="test.accuracy"'), tmp_path / "run", quiet=True)
    with pytest.raises(RecipeError) as exc:
        trainer.setup()
    assert exc.value.problems == [
        "train.select_by: split 'test' is not evaluated in this dataset; evaluated splits: val, ood "
        "(data.val, data.eval_splits), or worst or mean over all but val"
    ]
    assert not hasattr(trainer, "model")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--model", "test_vit"]
    result = CliRunner().invoke(app, [*args, "--set", 'train.select_by="test.loss"'])
    assert result.exit_code == 2
    assert "train.select_by: split 'test' is not evaluated" in result.output
