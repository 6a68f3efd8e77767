"""Mixup/CutMix, the weights' EMA and the drop rates, all from timm, on a tiny real model and real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy

from ftsgd.errors import RecipeError
from ftsgd.infer.evaluate import evaluate
from ftsgd.infer.export import load_exported_model
from ftsgd.inspect.inspection import inspect_model
from ftsgd.inspect.memory import estimate_memory
from ftsgd.model.prepare import prepare_model
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import OptimConfig
from ftsgd.train.regularisation import mix_batch, mix_seed
from ftsgd.train.trainer import Trainer


def recipe_for(data: Path, *extra: str):
    return load_recipe(
        "sgd-freeze-embed",
        [
            'model.name="test_vit"',
            "model.kwargs={img_size=32}",
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="flip"',
            "train.batch_size=16",
            "train.epochs=1",
            "optim.lr=0.05",
            *extra,
        ],
    )


def ready(recipe, tmp_path: Path) -> Trainer:
    trainer = Trainer(recipe, tmp_path / "unused", quiet=True)
    trainer.setup()
    return trainer


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


class Inputs:
    """A forward pre-hook that records the batches the model is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self.record)

    def record(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.seen.append(args[0].detach().clone())


# ------------------------------------------------------------------------------------------ mixup


def test_mixup_feeds_the_model_a_convex_mix_and_uses_the_soft_target_loss(
    image_folder: Path, tmp_path: Path
) -> None:
    # fp32: the test compares the step's loss with a direct fp32 computation
    trainer = ready(recipe_for(image_folder, "data.mixup=1.0", "optim.lr=1e-9", 'train.amp="none"'), tmp_path)
    assert isinstance(trainer.loss_fn, SoftTargetCrossEntropy)
    x, y = batch(1)
    y[0], y[-1] = 0, 1  # a pair with different labels, so lambda can be read off the target
    original = x.clone()
    inputs = Inputs(trainer.model)
    numpy_state = np.random.get_state()
    loss_sum, correct = trainer.step(x, y)

    assert torch.equal(x, original)  # the caller's batch is not mixed in place
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()  # numpy's global RNG untouched
    (seen,) = inputs.seen
    _, target = mix_batch(trainer.mixup, original, y, mix_seed(0, 0, 0))  # the same seeded mix
    lam = float(target[0, 0])
    assert 0 < lam < 1 and torch.allclose(target.sum(1), torch.ones(16))
    torch.testing.assert_close(seen, lam * original + (1 - lam) * original.flip(0))
    with torch.no_grad():
        logits = trainer.model(seen)
    expected = SoftTargetCrossEntropy()(logits, target).item() * 16
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    # train accuracy under mixup: against the class with the largest share of the mixed target
    assert correct == int((logits.argmax(1) == target.argmax(1)).sum())


def test_mixup_is_timms_own_with_the_recipes_settings(image_folder: Path, tmp_path: Path) -> None:
    """CutMix + Mixup per element with label smoothing: the mix equals timm's Mixup under the same numpy seed."""
    trainer = ready(
        recipe_for(
            image_folder,
            "data.mixup=0.8",
            "data.cutmix=1.0",
            'data.mixup_mode="elem"',
            "data.mixup_switch_prob=0.5",
            "train.label_smoothing=0.1",
        ),
        tmp_path,
    )
    m = trainer.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.mode, m.label_smoothing, m.num_classes) == (
        0.8,
        1.0,
        "elem",
        0.1,
        3,
    )
    x, y = batch(2)
    mixed, target = mix_batch(m, x, y, 1234)
    np.random.seed(1234)
    by_hand, hand_target = m(x.clone(), y)
    assert torch.equal(mixed, by_hand) and torch.equal(target, hand_target)
    assert not torch.equal(mixed, x)
    again = mix_batch(m, x, y, 1234)
    assert torch.equal(again[0], mixed)  # seeded: the same step mixes the same way on resume
    assert not torch.equal(mix_batch(m, x, y, 1235)[0], mixed)


def test_an_odd_last_batch_keeps_its_last_image_unmixed(image_folder: Path, tmp_path: Path) -> None:
    trainer = ready(recipe_for(image_folder, "data.mixup=1.0", "train.label_smoothing=0.1"), tmp_path)
    x, y = batch(3, n=5)
    mixed, target = mix_batch(trainer.mixup, x, y, 7)
    assert torch.equal(mixed[4], x[4])
    smoothed = torch.full((3,), 0.1 / 3)
    smoothed[y[4]] += 0.9
    torch.testing.assert_close(target[4], smoothed)
    assert not torch.equal(mixed[:4], x[:4])
    trainer.step(x, y)  # and a step takes it


def test_mixup_changes_the_weights_of_a_step(image_folder: Path, tmp_path: Path) -> None:
    plain = ready(recipe_for(image_folder), tmp_path)
    mixed = ready(recipe_for(image_folder, "data.mixup=1.0"), tmp_path)
    assert isinstance(plain.loss_fn, torch.nn.CrossEntropyLoss)
    x, y = batch(4)
    plain.step(x, y)
    mixed.step(x, y)
    a, b = plain.model.state_dict(), mixed.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_mixup_needs_an_even_batch_and_valid_settings() -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(
            "sgd-freeze-embed",
            [
                "data.cutmix=1.0",
                "train.batch_size=15",
                "data.mixup=-1",
                "data.mixup_prob=1.5",
                'data.mixup_mode="pairs"',
            ],
        )
    problems = "\n".join(exc.value.problems)
    assert "train.batch_size: data.mixup/data.cutmix mix each image with another" in problems
    assert "data.mixup: must be >= 0" in problems
    assert "data.mixup_prob: must be in [0, 1]" in problems
    assert "data.mixup_mode: unknown value 'pairs'; did you mean 'pair'?" in problems
    load_recipe("sgd-freeze-embed", ["train.batch_size=15"])  # odd is fine without mixing


# ------------------------------------------------------------------------------------------ EMA


def test_ema_follows_timms_update_rule(image_folder: Path, tmp_path: Path) -> None:
    trainer = ready(recipe_for(image_folder, "train.ema_decay=0.9"), tmp_path)
    ema = trainer.ema.module
    assert all(not p.requires_grad for p in ema.parameters())
    trainer.step(*batch(5))  # ModelEmaV3 copies the weights at the first step (decay 0 at step 1)
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for key, value in ema.state_dict().items():
        assert torch.equal(value, first[key]), key
    trainer.state.global_step = 1  # the Trainer's counter, which train_epoch advances
    trainer.step(*batch(6))
    second = trainer.model.state_dict()
    moved = 0
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * first[key] + 0.1 * second[key])
            moved += not torch.equal(value, second[key])
    assert moved > 0


def test_ema_weights_are_evaluated_and_exported(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(recipe_for(image_folder, "train.ema_decay=0.8"), out, quiet=True)
    summary = trainer.fit()
    assert summary["weights_exported"] == "ema" and summary["best_epoch"] == 1
    exported = load_file(str(out / "model.safetensors"))
    ema_state = trainer.ema.module.state_dict()
    raw = trainer.model.state_dict()
    assert exported.keys() == ema_state.keys()
    for key in exported:
        assert torch.equal(exported[key], ema_state[key]), key
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in exported:
        assert torch.equal(checkpoint["ema"][key], exported[key]), key
    # what was evaluated is what was exported
    model, _ = load_exported_model(out)
    val = trainer.evaluate_split(trainer.eval_splits["val"])
    assert val["loss"] == pytest.approx(summary["best"]["val"]["loss"], rel=1e-6)
    loader = trainer.eval_loader(trainer.eval_splits["val"])
    again = evaluate(model, loader, device=torch.device("cpu"), class_names=trainer.class_names)
    assert again["loss"] == pytest.approx(summary["best"]["val"]["loss"], rel=1e-5)


def test_ema_costs_one_more_copy_of_the_weights_in_the_estimate() -> None:
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    plain = estimate_memory(model, set(), OptimConfig())
    with_ema = estimate_memory(model, set(), OptimConfig(), ema=True)
    assert plain.ema == 0 and with_ema.ema == plain.weights
    assert with_ema.total == plain.total + plain.weights
    assert with_ema.adamw_total == plain.adamw_total  # the baseline stays plain AdamW
    report = inspect_model(
        load_recipe("sgd", ['model.name="test_vit"', "model.kwargs={img_size=32}", "train.ema_decay=0.99"]),
        3,
        activations=False,
    )
    assert report["memory"]["ema"] == report["memory"]["weights"] > 0


# ------------------------------------------------------------------------------------------ drop rates


def test_drop_rates_reach_timm_and_the_export_still_loads(image_folder: Path, tmp_path: Path) -> None:
    recipe = recipe_for(image_folder, "model.drop_path_rate=0.2", "model.drop_rate=0.3")
    model = prepare_model(recipe, 3).model
    drop_paths = [m for m in model.modules() if isinstance(m, DropPath)]
    assert drop_paths and max(m.drop_prob for m in drop_paths) == pytest.approx(0.2)
    assert model.head_drop.p == pytest.approx(0.3)
    out = tmp_path / "run"
    Trainer(recipe, out, quiet=True).fit()
    config = json.loads((out / "config.json").read_text())
    assert "drop_path_rate" not in config["model_args"] and "drop_rate" not in config["model_args"]
    loaded, meta = load_exported_model(out)
    assert meta["model_kwargs"] == {"img_size": 32}
    assert not any(isinstance(m, DropPath) for m in loaded.modules())


def test_drop_rates_are_checked() -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(
            "sgd",
            ["model.drop_path_rate=1.5", "model.drop_rate=0.1", "model.kwargs={drop_rate=0.2}"],
        )
    problems = exc.value.problems
    assert "model.drop_path_rate: must be in [0, 1) (0 = off), got 1.5" in problems
    assert "model.drop_rate: also given in model.kwargs; set it in one place" in problems
