"""A run's precision: recorded when it starts, kept by ``--resume``, used by its evaluations and ``ftsgd eval``.

Real tiny runs (``test_vit`` at 32 px, 5 steps per epoch): a bf16 run stopped after its first step and resumed
must end bit-for-bit as the uninterrupted bf16 run, whatever ``train.amp = "auto"`` means by then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftsgd.cli.evaluate import eval_command
from ftsgd.data.folders import discover_splits
from ftsgd.data.loader import build_loader
from ftsgd.errors import UsageError
from ftsgd.infer.evaluate import evaluate
from ftsgd.infer.export import export_precision, inference_transform, load_exported_model, read_export
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import DataConfig
from ftsgd.train.precision import started_amp
from ftsgd.train.trainer import Trainer
from ftsgd.utils.device import cpu_has_native_bf16, legacy_auto_amp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BF16 = 'train.amp="bf16"'
CPU = torch.device("cpu")


def bf16_recipe(data: Path, *extra: str):
    return load_recipe(
        "sgd-freeze-embed",
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="flip"',
            "train.batch_size=16",
            "train.epochs=2",
            "optim.lr=0.02",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def bf16_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole 2-epoch run in bf16 autocast (opted into), uninterrupted."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    Trainer(bf16_recipe(image_folder, BF16), out, quiet=True).fit()
    return out


@pytest.fixture(scope="module")
def stopped_bf16_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after its first step (a checkpoint, no summary)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert Trainer(bf16_recipe(image_folder, BF16), out, quiet=True, max_steps=1).fit() is None
    return out


def as_auto(run: Path, tmp_path: Path, *, record: bool) -> Path:
    """A copy of a stopped bf16 run whose recipe says ``auto`` (now fp32): a run started when ``auto`` was bf16.

    ``record=False`` also drops the checkpoint's record of its precision, as a checkpoint written before it.
    """
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    toml = copy / "recipe.toml"
    assert 'amp = "bf16"' in toml.read_text()
    toml.write_text(toml.read_text().replace('amp = "bf16"', 'amp = "auto"'))
    if not record:
        ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
        del ckpt["amp"]
        torch.save(ckpt, copy / "checkpoint.pt")
    return copy


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_continues_in_the_precision_the_run_started_with(
    bf16_run: Path, stopped_bf16_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert torch.load(stopped_bf16_run / "checkpoint.pt", weights_only=True)["amp"] == "bf16"
    run = as_auto(stopped_bf16_run, tmp_path, record=True)
    summary = Trainer(load_recipe(str(run / "recipe.toml")), run, resume=True, quiet=True).fit()
    assert summary is not None and summary["amp"] == "bf16"  # not fp32, what "auto" means now
    assert (
        'resuming in bf16 autocast, the precision this run started with (train.amp = "auto" now means fp32'
        in (capsys.readouterr().err)
    )
    assert same_weights(run, bf16_run)  # every step after the first computed in bf16, as uninterrupted
    assert torch.load(run / "checkpoint.pt", weights_only=True)["amp"] == "bf16"


@pytest.mark.slow
def test_a_checkpoint_without_a_record_continues_as_auto_resolved_when_it_started(
    bf16_run: Path, stopped_bf16_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = as_auto(stopped_bf16_run, tmp_path, record=False)
    summary = Trainer(load_recipe(str(run / "recipe.toml")), run, resume=True, quiet=True).fit()
    assert summary is not None
    err = capsys.readouterr().err
    assert "records no precision (written by an older ftsgd)" in err
    if cpu_has_native_bf16():  # the old "auto" was bf16 on this CPU: the run goes on as it started
        assert summary["amp"] == "bf16" and same_weights(run, bf16_run)
        assert "continuing in bf16 autocast" in err
    else:
        assert summary["amp"] == "none"


def test_older_checkpoints_without_a_record() -> None:
    # an explicit train.amp is what the run used; "auto" as resolved before; a scaler state proves fp16
    assert started_amp({}, "none", CPU, "ckpt") is None
    assert started_amp({}, "bf16", CPU, "ckpt") == torch.bfloat16
    assert started_amp({}, "auto", CPU, "ckpt") == legacy_auto_amp(CPU)
    assert started_amp({"amp": "none"}, "bf16", CPU, "ckpt") is None  # the record wins over the recipe
    with pytest.raises(UsageError, match="started in fp16 autocast, which needs a CUDA GPU"):
        started_amp({"scaler": {"scale": 65536.0}}, "auto", CPU, "ckpt")


@pytest.mark.slow
def test_training_evaluation_and_ftsgd_eval_give_the_same_numbers(bf16_run: Path, image_folder: Path) -> None:
    summary = json.loads((bf16_run / "summary.json").read_text())
    meta = read_export(bf16_run)[1]
    assert meta["amp"] == "bf16" and export_precision(meta, CPU) == torch.bfloat16
    results = eval_command(bf16_run, image_folder, splits=["val", "ood"], batch_size=16, num_workers=0)
    for split in ("val", "ood"):
        for key in ("accuracy", "loss", "n"):
            assert results[split][key] == summary["best"][split][key], (split, key)
    # the selected epoch was evaluated in bf16 (fp32, as on a CPU before, gives another loss)
    assert val_loss_in_fp32(bf16_run, image_folder) != summary["best"]["val"]["loss"]


def val_loss_in_fp32(run: Path, data: Path) -> float:
    """An export's val loss computed in fp32 (what ``ftsgd eval`` computed before exports recorded precision)."""
    model, meta = load_exported_model(run)
    classes = list(meta["class_names"])
    _, splits = discover_splits(DataConfig(root=str(data)), class_names=classes)
    loader = build_loader(
        splits["val"], inference_transform(meta), batch_size=16, training=False, seed=0, num_workers=0
    )
    return evaluate(model, loader, device=CPU, class_names=classes)["loss"]


def test_exports_without_a_record_are_evaluated_in_fp32() -> None:
    assert export_precision({}, CPU) is None
    assert export_precision({"amp": "none"}, CPU) is None
    assert export_precision({"amp": "fp16"}, CPU) is None  # fp16 is CUDA's; a note says so
