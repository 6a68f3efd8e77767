"""Memory-light training: the optimizer step inside backward, gradient checkpointing, channels_last,
torch.compile and the low-memory recipe, checked against the normal training step."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.errors import RecipeError, RunError
from ftsgd.model.embedding import find_embedding
from ftsgd.model.freeze import apply_freeze, frozen_parameter_names
from ftsgd.model.optim import StepInBackward, build_optimizer, set_lr
from ftsgd.recipe.load import load_recipe
from ftsgd.recipe.schema import FreezeConfig, OptimConfig
from ftsgd.train.trainer import Trainer

OPTIMIZERS = {
    "sgd": OptimConfig(name="sgd", lr=0.05, momentum=0.0),
    "sgd-momentum": OptimConfig(name="sgd", lr=0.05, momentum=0.9),
    "nesterov": OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True),
    "sgd-weight-decay": OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05),
}


def tiny_vit() -> tuple[torch.nn.Module, list[str]]:
    """test_vit at 32px with its patch embedding frozen, as ``ftsgd train`` would prepare it."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3)
    frozen = frozen_parameter_names(model, FreezeConfig(policy="embed"), find_embedding(model, (3, 32, 32)))
    apply_freeze(model, frozen)
    model.train()
    return model, frozen


def run_steps(model, optimizer, batches, lrs, *, autocast: torch.dtype | None = None) -> None:
    for (x, y), lr in zip(batches, lrs, strict=True):
        set_lr([optimizer], lr)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        optimizer.step()


def batches(n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_in_backward_gives_the_weights_of_the_normal_step(name: str) -> None:
    cfg = OPTIMIZERS[name]
    normal, frozen = tiny_vit()
    inside = copy.deepcopy(normal)
    before = {n: p.detach().clone() for n, p in normal.named_parameters()}
    data, lrs = batches(), [cfg.lr, cfg.lr * 0.5, cfg.lr * 0.25, cfg.lr * 0.1]  # a decaying schedule

    run_steps(normal, build_optimizer(normal, cfg), data, lrs)

    # Record how many gradients exist whenever one is completed: this hook is registered before
    # StepInBackward's, so it runs first and sees the new gradient before it is applied and freed.
    live: list[int] = []
    params = [p for p in inside.parameters() if p.requires_grad]
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: live.append(sum(q.grad is not None for q in params)))
    opt = build_optimizer(inside, OptimConfig(**{**cfg.__dict__, "step_in_backward": True}))
    assert isinstance(opt, StepInBackward)
    run_steps(inside, opt, data, lrs)

    assert live and max(live) == 1, "a full set of gradients existed during backward"
    assert all(p.grad is None for p in inside.parameters()), "a .grad stayed allocated after backward"
    for (n, a), b in zip(normal.named_parameters(), inside.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        if n in frozen:
            assert torch.equal(b, before[n]) and b.grad is None
        else:
            assert not torch.equal(b, before[n]), f"{n} was never updated"


def test_step_in_backward_under_bf16_autocast_on_cpu() -> None:
    normal, _ = tiny_vit()
    inside = copy.deepcopy(normal)
    cfg = OPTIMIZERS["sgd-momentum"]
    data, lrs = batches(3), [0.05] * 3
    run_steps(normal, build_optimizer(normal, cfg), data, lrs, autocast=torch.bfloat16)
    opt = build_optimizer(inside, OptimConfig(**{**cfg.__dict__, "step_in_backward": True}))
    run_steps(inside, opt, data, lrs, autocast=torch.bfloat16)
    for a, b in zip(normal.parameters(), inside.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in inside.parameters())


def test_learning_rate_reaches_every_per_parameter_optimizer() -> None:
    model, _ = tiny_vit()
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.0, step_in_backward=True))
    before = [p.detach().clone() for p in model.parameters()]
    run_steps(model, opt, batches(1), [0.0])  # lr 0: nothing may move
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert {g["lr"] for g in opt.param_groups} == {0.0}
    run_steps(model, opt, batches(1), [0.1])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- through the Trainer


def train(recipe, out: Path, **kwargs):
    return Trainer(recipe, out, **kwargs).fit()


def recipe_for(data: Path, *extra: str, model: str = "test_vit", base: str = "sgd-freeze-embed"):
    kwargs = "model.kwargs={img_size=32}" if model == "test_vit" else "model.kwargs={}"
    return load_recipe(
        base,
        [
            f'model.name="{model}"',
            kwargs,
            f'data.root="{data}"',
            "data.num_workers=0",
            'data.augment="flip"',
            "data.img_size=32",
            "train.batch_size=16",
            "train.epochs=2",
            "optim.lr=0.02",
            *extra,
        ],
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "extra",
    [("optim.momentum=0.9",), ('optim.name="adamw"', "optim.lr=1e-3", "optim.weight_decay=0.05")],
    ids=["sgd-momentum", "adamw"],
)
def test_train_with_step_in_backward_matches_the_normal_run(
    image_folder: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    normal = recipe_for(image_folder, *extra)
    train(normal, tmp_path / "normal", quiet=True)
    summary = train(
        recipe_for(image_folder, *extra, "optim.step_in_backward=true"), tmp_path / "inside", quiet=True
    )
    assert_same_weights(tmp_path / "normal", tmp_path / "inside")
    # the cosine schedule, stepped per epoch, is what both runs used
    history = [json.loads(line) for line in (tmp_path / "inside" / "metrics.jsonl").read_text().splitlines()]
    lr = normal.optim.lr
    assert [r["lr"] for r in history] == pytest.approx([lr, lr * 0.5 * (1 + math.cos(math.pi / 2))])
    # peak memory per epoch, and the summary's is their maximum
    assert all(r["peak_memory_bytes"] > 0 for r in history)
    assert summary["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in history)


def test_resume_with_step_in_backward_reproduces_the_uninterrupted_run(
    image_folder: Path, tmp_path: Path
) -> None:
    extra = ("optim.step_in_backward=true", "optim.momentum=0.9", 'data.augment="rrc_flip"')
    train(recipe_for(image_folder, *extra), tmp_path / "full", quiet=True)
    part = tmp_path / "part"
    stopped = train(recipe_for(image_folder, *extra), part, quiet=True, max_steps=3)
    assert stopped is None  # mid-epoch: 72 images in batches of 16 are 5 steps
    state = torch.load(part / "checkpoint.pt", weights_only=True)["optimizer"]
    assert "per_parameter" in state and any(s["state"] for s in state["per_parameter"])  # momentum saved
    train(load_recipe(str(part / "recipe.toml")), part, resume=True, quiet=True)
    assert_same_weights(tmp_path / "full", part, rtol=0, atol=0)


def test_resuming_a_normal_checkpoint_with_step_in_backward_is_refused(
    image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(recipe_for(image_folder, "optim.momentum=0.9"), out, quiet=True, max_steps=2)
    changed = recipe_for(image_folder, "optim.momentum=0.9", "optim.step_in_backward=true")
    with pytest.raises(ValueError, match=r"not saved with optim\.step_in_backward"):
        train(changed, out, resume=True, quiet=True)


@pytest.mark.parametrize(
    ("sets", "fragments"),
    [
        (
            ["train.micro_batch_size=8"],
            ["cannot be combined with gradient accumulation", "micro_batch_size = 0"],
        ),
        (["train.grad_clip=1.0"], ["global-norm clipping needs every gradient at once", "grad_clip = 0"]),
        (["train.amp=fp16"], ['train.amp = "fp16"', "overflow", "bf16"]),
    ],
    ids=["accumulation", "grad_clip", "fp16"],
)
def test_impossible_combinations_are_refused_by_the_cli(
    image_folder: Path, tmp_path: Path, sets: list[str], fragments: list[str]
) -> None:
    args = ["train", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--model", "test_vit"]
    args += ["--set", "optim.step_in_backward=true", *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "optim.step_in_backward" in message
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- other memory/speed options


def test_grad_checkpointing_gives_the_same_weights(image_folder: Path, tmp_path: Path) -> None:
    train(recipe_for(image_folder, "train.epochs=1"), tmp_path / "plain", quiet=True)
    train(
        recipe_for(image_folder, "train.epochs=1", "train.grad_checkpointing=true"),
        tmp_path / "ckpt",
        quiet=True,
    )
    assert_same_weights(tmp_path / "plain", tmp_path / "ckpt")


def test_grad_checkpointing_unsupported_model_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    recipe = recipe_for(image_folder, "train.grad_checkpointing=true", model="cspresnet50")
    with pytest.raises(RecipeError, match="cspresnet50 does not support gradient checkpointing"):
        train(recipe, tmp_path / "run", quiet=True)
    result = CliRunner().invoke(app, ["inspect", "cspresnet50", "--set", "train.grad_checkpointing=true"])
    assert result.exit_code == 2 and "does not support gradient checkpointing" in result.stderr


@pytest.mark.parametrize("model", ["test_convnext", "test_resnet"])
def test_channels_last_trains_to_the_same_weights(image_folder: Path, tmp_path: Path, model: str) -> None:
    fp32 = 'train.amp="none"'  # bf16 rounding would hide (or fake) a difference in the kernels' results
    train(recipe_for(image_folder, "train.epochs=1", fp32, model=model), tmp_path / "plain", quiet=True)
    train(
        recipe_for(image_folder, "train.epochs=1", fp32, "train.channels_last=true", model=model),
        tmp_path / "cl",
        quiet=True,
    )
    # different convolution kernels: equal up to float rounding, not bit for bit
    assert_same_weights(tmp_path / "plain", tmp_path / "cl", rtol=1e-3, atol=1e-5)
    assert (tmp_path / "cl" / "model.safetensors").is_file()


@pytest.mark.slow
def test_compile_trains_through_the_compiled_module(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor (the default backend) needs ~50 s to compile even test_vit on this 2-core CPU, so the
    # wiring is tested with Dynamo's "eager" backend: the model is traced and run as graphs.
    calls = []
    real = torch.compile

    def compile_eager(model, **kwargs):
        calls.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    extra = ("train.epochs=1", "optim.step_in_backward=true", "optim.momentum=0.0")
    train(recipe_for(image_folder, *extra), tmp_path / "plain", quiet=True)
    train(recipe_for(image_folder, *extra, "train.compile=true"), tmp_path / "compiled", quiet=True)
    assert len(calls) == 1
    assert_same_weights(tmp_path / "plain", tmp_path / "compiled", rtol=1e-4, atol=1e-6)
    assert not any(k.startswith("_orig_mod") for k in final_weights(tmp_path / "compiled"))


@pytest.mark.slow
def test_compile_failure_names_the_option(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    torch._dynamo.reset()
    with pytest.raises(RunError, match=r"torch.compile failed .*set train.compile = false"):
        train(recipe_for(image_folder, "train.epochs=1", "train.compile=true"), tmp_path / "run", quiet=True)


def test_lowmem_recipe() -> None:
    r = load_recipe("sgd-freeze-embed-lowmem")
    assert r.optim.name == "sgd" and r.optim.momentum == 0.0 and r.optim.step_in_backward
    assert r.freeze.policy == "embed" and r.train.grad_checkpointing
    assert r.grad_accum_steps == 1 and r.train.grad_clip == 0 and r.train.amp != "fp16"
    assert r.description


def test_lowmem_recipe_trains(image_folder: Path, tmp_path: Path) -> None:
    summary = train(
        recipe_for(image_folder, "train.epochs=1", "optim.lr=0.05", base="sgd-freeze-embed-lowmem"),
        tmp_path / "run",
        quiet=True,
    )
    assert summary["recipe"] == "sgd-freeze-embed-lowmem" and summary["frozen"]
    assert (tmp_path / "run" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- memory hygiene


def test_export_writes_the_model_tensors_without_copying_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ftsgd.infer.export import _export_tensors, export_model

    model, _ = tiny_vit()
    tensors = _export_tensors(model)
    own = model.state_dict()
    assert all(tensors[k].data_ptr() == own[k].data_ptr() for k in own)  # CPU, contiguous: no copy

    # tied weights (one storage under two names) and channels_last tensors are copied: safetensors needs it
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    t2 = _export_tensors(tied)
    assert t2["0.weight"].data_ptr() == tied[0].weight.data_ptr()
    assert t2["1.weight"].data_ptr() != tied[0].weight.data_ptr() and torch.equal(
        t2["1.weight"], t2["0.weight"]
    )
    t3 = _export_tensors(conv)
    assert t3["weight"].is_contiguous() and torch.equal(t3["weight"], conv.weight)

    export_model(
        model,
        tmp_path,
        architecture="test_vit",
        class_names=["a", "b", "c"],
        data_config={"input_size": (3, 32, 32)},
        recipe_name="t",
        model_kwargs={"img_size": 32},
    )
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in own.items())
