"""Training on one skewed folder of class folders: the recorded split, balanced sampling, class weights,
metrics beyond accuracy and worst/mean selection, with a resume that ends bitwise as the full run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.errors import RecipeError
from ftsgd.infer.metrics import aggregate_splits, selection_value
from ftsgd.recipe.load import load_recipe
from ftsgd.train.skew import WeightedCrossEntropy, class_weights, skew_warnings
from ftsgd.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = {"cat": 30, "dog": 10, "eel": 6}


def sets(root: Path, *extra: str) -> list[str]:
    """One folder of class folders, a test split drawn from it, and an ood/ folder beside it evaluated too."""
    return [
        'model.name="test_vit"',
        "model.kwargs={img_size=32}",
        f'data.root="{root}"',
        "data.num_workers=0",
        'data.augment="flip"',
        "data.test_fraction=0.2",
        f'data.eval_splits=["{root.parent / "ood"}"]',
        'data.sampler="balanced"',
        'train.class_weights="balanced"',
        'train.select_by="worst.macro_f1"',
        "train.batch_size=8",
        "train.epochs=2",
        "optim.lr=0.02",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full 2-epoch run, and one stopped after 3 of its 8 steps and resumed after the folder gained images."""
    from PIL import Image

    base = tmp_path_factory.mktemp("skew")
    root = base / "photos"
    g = torch.Generator().manual_seed(0)
    for folder, counts in ((root, COUNTS), (base / "ood", {c: 2 for c in COUNTS})):
        for cls, n in counts.items():
            (folder / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / cls / f"{i:02d}.png")
    full, part = base / "full", base / "part"
    Trainer(load_recipe(None, sets(root)), full, quiet=True).fit()
    assert Trainer(load_recipe(None, sets(root)), part, quiet=True, max_steps=3).fit() is None
    (root / "dog" / "99.png").write_bytes((root / "dog" / "00.png").read_bytes())  # not in the recorded split
    with pytest.raises(RecipeError) as exc:  # a resume keeps the split it started with
        Trainer(load_recipe(None, sets(root, "data.split_seed=4")), part, quiet=True, resume=True).setup()
    assert exc.value.problems[0].startswith(
        "data.split_seed: the run's split was drawn with 0, this command gives 4"
    )
    Trainer(load_recipe(str(part / "recipe.toml")), part, quiet=True, resume=True).fit()
    return {"root": root, "full": full, "part": part}


@pytest.mark.slow
def test_the_resumed_balanced_run_is_bitwise_the_full_run(runs: dict[str, Path]) -> None:
    a = load_file(str(runs["full"] / "model.safetensors"))
    b = load_file(str(runs["part"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runs["full"] / "split.json").read_text() == (runs["part"] / "split.json").read_text()
    strip = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
    lines = [
        [
            {k: v for k, v in json.loads(x).items() if k not in strip}
            for x in (runs[r] / "metrics.jsonl").open()
        ]
        for r in ("full", "part")
    ]
    assert lines[0] == lines[1]


@pytest.mark.slow
def test_metrics_and_aggregates_are_recorded_and_select(runs: dict[str, Path]) -> None:
    split = json.loads((runs["full"] / "split.json").read_text())
    assert {name: len(rows) for name, rows in split["splits"].items()} == {"train": 32, "val": 5, "test": 9}
    record = json.loads((runs["full"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(record["splits"]) == ["val", "test", "ood", "worst", "mean"]
    test, ood = record["splits"]["test"], record["splits"]["ood"]
    assert set(test) >= {"accuracy", "loss", "n", "macro_f1", "balanced_accuracy"}
    assert record["splits"]["worst"]["macro_f1"] == min(test["macro_f1"], ood["macro_f1"])
    assert record["splits"]["worst"]["loss"] == max(test["loss"], ood["loss"])
    assert record["splits"]["mean"]["accuracy"] == pytest.approx((test["accuracy"] + ood["accuracy"]) / 2)
    assert set(record["per_class"]) == {"val", "test", "ood"}
    assert record["per_class"]["test"]["eel"]["support"] == 1
    assert set(record["per_class"]["test"]["cat"]) == {
        "accuracy",
        "n",
        "precision",
        "recall",
        "f1",
        "support",
        "predicted",
    }
    summary = json.loads((runs["full"] / "summary.json").read_text())
    assert summary["select_by"] == "worst.macro_f1"
    assert summary["best_value"] == summary["best"]["worst"]["macro_f1"]
    final = summary["final"]
    both = (final["test"]["balanced_accuracy"] + final["ood"]["balanced_accuracy"]) / 2
    assert final["mean"]["balanced_accuracy"] == pytest.approx(both)


@pytest.mark.slow
def test_eval_reads_exactly_the_recorded_validation_files(runs: dict[str, Path]) -> None:
    args = ["eval", str(runs["full"]), "--data", str(runs["root"]), "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, [*args, "--split", "val"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["val"]
    assert {c: pc["n"] for c, pc in out["val"]["per_class"].items()} == {"cat": 3, "dog": 1, "eel": 1}
    history = [json.loads(x) for x in (runs["full"] / "metrics.jsonl").open()]
    best = history[json.loads((runs["full"] / "summary.json").read_text())["best_epoch"] - 1]
    assert out["val"]["macro_f1"] == pytest.approx(best["splits"]["val"]["macro_f1"])
    csv = CliRunner().invoke(app, [*args[:-1], "--csv"])
    assert csv.exit_code == 0, csv.output
    rows = csv.stdout.splitlines()
    assert rows[0] == "split,class,support,accuracy,precision,recall,f1,macro_f1,balanced_accuracy,loss"
    assert [r.split(",")[:3] for r in rows[1:] if r.split(",")[1] == ""] == [
        ["val", "", "5"],
        ["test", "", "9"],
    ]
    assert len(rows) == 1 + 2 + 2 * 3  # a header, a row per split and one per class of each
    # bare weights, away from their run directory, do not say which images were held out
    bare = runs["root"].parent / "bare"
    bare.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        (bare / name).write_bytes((runs["full"] / name).read_bytes())
    refused = CliRunner().invoke(app, ["eval", str(bare), "--data", str(runs["root"]), "--device", "cpu"])
    assert refused.exit_code == 2
    assert "split.json; pass the run directory" in refused.output


@pytest.mark.slow
def test_bad_class_weights_and_select_by_stop_before_any_file(runs: dict[str, Path], tmp_path: Path) -> None:
    root = runs["root"]
    cases = [
        ("train.class_weights=[1.0, 2.0]", "train.class_weights: 2 weight(s) for 3 classes"),
        ('train.select_by="sketch.accuracy"', "train.select_by: split 'sketch' is not evaluated"),
    ]
    for n, (bad, text) in enumerate(cases):
        out = tmp_path / f"run{n}"
        result = CliRunner().invoke(
            app, ["train", "--data", str(root), "--out", str(out), *_set(sets(root, bad))]
        )
        assert result.exit_code == 2, result.output
        assert text in result.output
        assert not out.exists() or not any(out.iterdir())
    no_other = load_recipe(
        None, [*sets(root, 'train.select_by="mean.accuracy"'), "data.test_fraction=0", "data.eval_splits=[]"]
    )
    with pytest.raises(RecipeError, match="'mean' aggregates the evaluation splits other than val"):
        Trainer(no_other, tmp_path / "mean", quiet=True).setup()


def _set(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def test_balanced_class_weights_and_the_weighted_loss() -> None:
    recipe = load_recipe(None, ['train.class_weights="balanced"'])
    assert class_weights(recipe, [30, 10, 5]) == pytest.approx([0.5, 1.5, 3.0])  # 45 / (3 * n)
    explicit = load_recipe(None, ["train.class_weights=[1, 4]"])
    assert class_weights(explicit, [9, 1]) == [1.0, 4.0]
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    loss = WeightedCrossEntropy([1.0, 4.0])(logits, target)
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert loss.item() == pytest.approx(((plain[0] + 4 * plain[1] + 4 * plain[2]) / 3).item())  # per image


def test_a_tenfold_skew_says_what_to_set() -> None:
    plain = load_recipe(None, [])
    (message,) = skew_warnings(plain, ["a", "b", "c"], [50, 20, 5])
    assert "'a' has 50 images, 'c' 5 (10x)" in message
    assert 'data.sampler = "balanced"' in message and "val.balanced_accuracy" in message
    assert skew_warnings(plain, ["a", "b"], [49, 5]) == []
    assert skew_warnings(load_recipe(None, ['data.sampler="balanced"']), ["a", "c"], [50, 5]) == []


def test_worst_and_mean_over_the_splits_other_than_val() -> None:
    results = {
        "val": {"accuracy": 0.1, "loss": 9.0, "macro_f1": 0.1, "balanced_accuracy": 0.1},
        "ood": {"accuracy": 0.6, "loss": 1.0, "macro_f1": 0.5, "balanced_accuracy": 0.4},
        "sketch": {"accuracy": 0.2, "loss": 3.0, "macro_f1": 0.3, "balanced_accuracy": 0.6},
    }
    assert aggregate_splits(results) == {
        "worst": {"accuracy": 0.2, "loss": 3.0, "macro_f1": 0.3, "balanced_accuracy": 0.4},
        "mean": pytest.approx({"accuracy": 0.4, "loss": 2.0, "macro_f1": 0.4, "balanced_accuracy": 0.5}),
    }
    assert aggregate_splits({"val": results["val"]}) == {}
    # recorded over two or more splits besides val; over one, selecting by worst or mean takes that split
    one = {"val": results["val"], "ood": results["ood"]}
    assert aggregate_splits(one) == {}
    assert selection_value(one, "worst", "loss") == selection_value(one, "mean", "loss") == 1.0
