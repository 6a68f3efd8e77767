"""The Trainer: its steps called one by one, and whole fine-tunes on generated image folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from ftsgd.errors import UsageError
from ftsgd.recipe.load import load_recipe
from ftsgd.train.trainer import Trainer

MODELS = {
    "test_vit": "model.kwargs={img_size=32}",
    "test_resnet": "model.kwargs={}",
    "test_convnext": "model.kwargs={}",
}


def make_weights(tmp_path: Path, name: str, kwargs: dict, seed: int = 1) -> Path:
    """A stand-in for pretrained weights: a seeded random init saved as safetensors (1000 classes)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / f"{name}-init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def train(recipe, out: Path, **kwargs):
    """A whole fine-tune; the summary, or None when max_steps stopped it early."""
    return Trainer(recipe, out, **kwargs).fit()


FP32 = 'train.amp="none"'
"""For tests that compare a step with a direct fp32 computation (pinned, whatever ``auto`` means by then)."""


def recipe_for(data: Path, model: str, *extra: str, base: str = "sgd-freeze-embed"):
    return load_recipe(
        base,
        [
            f'model.name="{model}"',
            MODELS.get(model, "model.kwargs={}"),
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="flip"',
            "data.img_size=32",
            "train.batch_size=16",
            "train.epochs=3",
            "optim.lr=0.02",
            *extra,
        ],
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_fine_tune_end_to_end(model: str, image_folder: Path, tmp_path: Path) -> None:
    kwargs = {"img_size": 32} if model == "test_vit" else {}
    weights = make_weights(tmp_path, model, kwargs)
    recipe = recipe_for(image_folder, model, f'model.weights="{weights}"')
    out = tmp_path / "run"
    argv = ["/venv/bin/ftsgd", "train", "--data", str(image_folder)]
    summary = train(recipe, out, quiet=True, argv=argv)

    # run directory contents
    for name in (
        "recipe.toml",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "config.json",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for r in history:
        assert set(r["splits"]) == {"val", "ood"}
        assert r["images_per_s"] > 0 and r["epoch_time_s"] > 0 and r["peak_memory_bytes"] > 0
        assert 0 <= r["train_accuracy"] <= 1
    # cosine stepped per epoch, as the paper did
    assert [r["lr"] for r in history] == pytest.approx(
        [0.02 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    )
    # loss goes down
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # summary: best epoch by val accuracy
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    best = max(range(3), key=lambda i: (history[i]["splits"]["val"]["accuracy"], -i))
    assert summary["best_epoch"] == best + 1
    assert summary["best"] == history[best]["splits"]
    assert summary["classes"] == ["circle", "square", "triangle"]
    assert summary["frozen"] and summary["frozen_params"] > 0
    assert "versions" in summary
    assert summary["command"] == f"ftsgd train --data {image_folder}"  # not python's argv[0]
    assert summary["amp"] == "none"  # train.amp = "auto" is fp32 on every CPU (docs/precision.md)

    # frozen parameters bit-for-bit unchanged, trainable ones moved
    init = load_file(str(weights))
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    frozen = set(summary["frozen"])
    head = {k for k in final if k.startswith(("head", "fc."))}
    for name, tensor in final.items():
        if name in frozen:
            assert torch.equal(tensor, init[name]), f"frozen {name} changed"
    moved = [
        n
        for n, t in final.items()
        if n not in frozen
        and n not in head
        and t.is_floating_point()
        and n in init
        and init[n].shape == t.shape
        and not torch.equal(t, init[n])
    ]
    assert len(moved) > 0
    trainable_params = [
        n for n in final if n not in frozen and n in init and "running" not in n and "num_batches" not in n
    ]
    assert set(moved) <= set(trainable_params) | {n for n in final if "running" in n}


def test_exported_weights_load_in_timm_with_identical_logits(image_folder: Path, tmp_path: Path) -> None:
    recipe = recipe_for(image_folder, "test_vit", "train.epochs=1")
    out = tmp_path / "run"
    train(recipe, out, quiet=True)
    ours = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    model = timm.create_model(
        "test_vit",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 3},
        num_classes=3,
        img_size=32,
    ).eval()
    reference = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    reference.load_state_dict(ours)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run_bitwise(image_folder: Path, tmp_path: Path) -> None:
    extra = ("train.checkpoint_every=2", "train.epochs=2", 'data.augment="rrc_flip"')
    full = tmp_path / "full"
    train(recipe_for(image_folder, "test_vit", *extra), full, quiet=True)

    for stop in (3, 7):  # mid-epoch 1, and mid-epoch 2 (5 steps per epoch)
        part = tmp_path / f"part{stop}"
        result = train(recipe_for(image_folder, "test_vit", *extra), part, quiet=True, max_steps=stop)
        assert result is None
        assert torch.load(part / "checkpoint.pt", weights_only=True)["state"]["global_step"] == stop
        assert not (part / "summary.json").exists()
        resumed = train(load_recipe(str(part / "recipe.toml")), part, resume=True, quiet=True)
        a = torch.load(full / "checkpoint.pt", weights_only=True)
        b = torch.load(part / "checkpoint.pt", weights_only=True)
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert (
            load_file(str(full / "model.safetensors")).keys()
            == load_file(str(part / "model.safetensors")).keys()
        )
        for key, value in load_file(str(full / "model.safetensors")).items():
            assert torch.equal(value, load_file(str(part / "model.safetensors"))[key])
        full_lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
        part_lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
        strip = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
        assert [{k: v for k, v in r.items() if k not in strip} for r in full_lines] == [
            {k: v for k, v in r.items() if k not in strip} for r in part_lines
        ]
        assert resumed["best_epoch"] == json.loads((full / "summary.json").read_text())["best_epoch"]


def ready(recipe, tmp_path: Path) -> Trainer:
    trainer = Trainer(recipe, tmp_path / "unused", quiet=True)
    trainer.setup()
    return trainer


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_micro_batches_give_the_same_step_as_one_batch(image_folder: Path, tmp_path: Path) -> None:
    common = ("optim.momentum=0.9", "optim.lr=0.5")
    whole = ready(recipe_for(image_folder, "test_vit", *common, FP32), tmp_path)
    micro = ready(recipe_for(image_folder, "test_vit", *common, FP32, "train.micro_batch_size=4"), tmp_path)
    assert micro.micro == 4
    before = weights_of(whole)
    for seed in (0, 1):  # two steps: the momentum buffers must agree too
        x, y = batch(seed)
        loss_a, correct_a = whole.step(x, y)
        loss_b, correct_b = micro.step(x, y)
        assert loss_a == pytest.approx(loss_b, rel=1e-5) and correct_a == correct_b
    a, b = weights_of(whole), weights_of(micro)
    assert any(not torch.equal(a[k], before[k]) for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_step_returns_the_summed_loss_and_hits(image_folder: Path, tmp_path: Path) -> None:
    trainer = ready(recipe_for(image_folder, "test_vit", "optim.lr=1e-9", FP32), tmp_path)
    x, y = batch(3)
    with torch.no_grad():
        logits = trainer.model(x)
    expected = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    loss_sum, correct = trainer.step(x, y)
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    assert correct == int((logits.argmax(1) == y).sum())


def test_gradient_clipping_bounds_the_update(image_folder: Path, tmp_path: Path) -> None:
    common = ("optim.momentum=0", "optim.lr=1.0")
    clipped = ready(recipe_for(image_folder, "test_vit", *common, "train.grad_clip=0.01"), tmp_path)
    free = ready(recipe_for(image_folder, "test_vit", *common), tmp_path)
    moves = []
    for trainer in (clipped, free):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.step(*batch(5))
        after = dict(trainer.model.named_parameters())
        moves.append(torch.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before)).item())
    # one SGD step of lr 1 with the global gradient norm clipped to 0.01 (float32 rounding aside)
    assert moves[0] == pytest.approx(0.01, rel=1e-3)
    assert moves[1] > 0.1


def test_label_smoothing_changes_the_loss(image_folder: Path, tmp_path: Path) -> None:
    x, y = batch(7)
    plain = ready(recipe_for(image_folder, "test_vit", "optim.lr=1e-9", FP32), tmp_path)
    smooth = ready(
        recipe_for(image_folder, "test_vit", "optim.lr=1e-9", "train.label_smoothing=0.5", FP32), tmp_path
    )
    with torch.no_grad():
        logits = plain.model(x)
    loss_plain, _ = plain.step(x, y)
    loss_smooth, _ = smooth.step(x, y)
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.5, reduction="sum").item()
    assert loss_smooth == pytest.approx(expected, rel=1e-5)
    assert loss_plain != pytest.approx(loss_smooth, rel=1e-3)


def test_amp_and_device_resolution_on_cpu() -> None:
    from ftsgd.utils.device import cpu_has_native_bf16, legacy_auto_amp, resolve_amp, resolve_device

    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    # "auto" is fp32 whatever the CPU's bf16 hardware: bf16 moved SGD freeze-embed's results (docs/precision.md)
    modes = ("auto", "bf16", "fp16", "none")
    assert [resolve_amp(mode, cpu) for mode in modes] == [None, torch.bfloat16, None, None]
    # what "auto" meant before: how a checkpoint that records no precision is continued
    assert legacy_auto_amp(cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


def test_step_schedule_and_warmup_reach_the_optimizer(image_folder: Path, tmp_path: Path) -> None:
    recipe = recipe_for(
        image_folder,
        "test_vit",
        "train.epochs=3",
        'schedule.name="step"',
        "schedule.decay_epochs=1",
        "schedule.decay_rate=0.5",
        "schedule.warmup_epochs=1",
    )
    train(recipe, tmp_path / "run", quiet=True)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.02 * 1 / 2, 0.02 * 0.5, 0.02 * 0.25])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_resume_keeps_nothing_of_the_checkpoint_file(image_folder: Path, tmp_path: Path) -> None:
    """checkpoint.pt is memory-mapped to resume; training must not run with any of it still mapped.

    SGD with momentum: ``optimizer.load_state_dict`` would keep the checkpoint's momentum buffers as
    they are, i.e. pages of the mapped file, for the whole run (and the replaced file on disk).
    """
    out = tmp_path / "run"
    extra = ("train.checkpoint_every=2", "train.epochs=1")
    train(recipe_for(image_folder, "test_vit", *extra), out, quiet=True, max_steps=2)
    checkpoint = str((out / "checkpoint.pt").resolve())
    trainer = Trainer(load_recipe(str(out / "recipe.toml")), out, resume=True, quiet=True)
    trainer.setup()
    assert trainer.state.global_step == 2
    assert checkpoint not in Path("/proc/self/maps").read_text(), "the checkpoint file is still mapped"
    assert trainer.fit() is not None


def test_short_run_reproduces_the_pre_redesign_weights(tmp_path: Path) -> None:
    """The weights of a short run, pinned from the code before the Trainer redesign (single thread).

    Micro-batching, clipping, label smoothing, augmentation and momentum are all on, for a ViT and a
    BatchNorm CNN, so a change to any of them in the loop moves these sums.
    """
    from ftsgd.data.synthetic import make_image_folder

    pinned = json.loads((Path(__file__).parents[1] / "fixtures" / "pinned_weights.json").read_text())
    data = make_image_folder(tmp_path / "data", classes=3, size=32, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model, kwargs in (("test_vit", "model.kwargs={img_size=32}"), ("test_resnet", "model.kwargs={}")):
            recipe = load_recipe(
                "sgd-freeze-embed",
                [
                    f'model.name="{model}"',
                    kwargs,
                    f'data.root="{data}"',
                    "data.num_workers=0",
                    'data.augment="rrc_flip"',
                    "data.img_size=32",
                    "train.batch_size=16",
                    "train.micro_batch_size=8",
                    "train.epochs=2",
                    "optim.lr=0.02",
                    "train.label_smoothing=0.1",
                    "train.grad_clip=1.0",
                    'train.amp="none"',  # pinned in fp32, the CPU default of that time
                ],
            )
            train(recipe, tmp_path / model, quiet=True)
            final = torch.load(tmp_path / model / "checkpoint.pt", weights_only=True)["model"]
            sums = {k: [v.double().sum().item(), v.double().pow(2).sum().item()] for k, v in final.items()}
            assert set(pinned[model]) <= set(sums)
            for key, (total, squares) in pinned[model].items():
                assert sums[key][0] == pytest.approx(total, rel=1e-4, abs=1e-5), key
                assert sums[key][1] == pytest.approx(squares, rel=1e-4, abs=1e-5), key
    finally:
        torch.set_num_threads(threads)


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    from ftsgd.utils.device import native_bf16_in

    assert not native_bf16_in("flags\t\t: fpu avx2 avx512f avx512bw\n")  # AVX-512 emulates bf16: slower
    assert native_bf16_in("processor: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert native_bf16_in("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert native_bf16_in("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert not native_bf16_in("")
