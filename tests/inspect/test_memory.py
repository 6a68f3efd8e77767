"""Training-state memory estimate (ftsgd.memory): exact bytes on small models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ftsgd.inspect.memory import MemoryEstimate, estimate_memory, format_bytes, state_slots
from ftsgd.recipe.schema import OptimConfig

# Linear(10, 20) = 200 + 20 parameters, Linear(20, 5) = 100 + 5: 325 in all, 1300 bytes in fp32.
N = 325
FIRST_LAYER = ["0.weight", "0.bias"]


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def test_sgd_momentum_is_12_bytes_per_parameter(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, [], OptimConfig(name="sgd", momentum=0.9))
    assert est == MemoryEstimate(
        weights=4 * N,
        gradients=4 * N,
        optimizer_state=4 * N,
        total=12 * N,
        adamw_total=16 * N,
        ratio=0.75,
        bytes_per_param=12.0,
        step_in_backward=False,
        activations=0,
        params=N,
        trainable_params=N,
    )


def test_sgd_without_momentum_is_8_bytes_per_parameter(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, set(), OptimConfig(name="sgd", momentum=0.0))
    assert (est.optimizer_state, est.total, est.bytes_per_param, est.ratio) == (0, 8 * N, 8.0, 0.5)


def test_adamw_is_16_bytes_per_parameter(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, [], OptimConfig(name="adamw"))
    assert (est.optimizer_state, est.total, est.adamw_total, est.bytes_per_param, est.ratio) == (
        8 * N,
        16 * N,
        16 * N,
        16.0,
        1.0,
    )


def test_frozen_parameters_cost_only_their_weights(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, FIRST_LAYER, OptimConfig(name="sgd", momentum=0.9))
    # 220 frozen parameters at 4 B, 105 trainable at 12 B
    assert (est.weights, est.gradients, est.optimizer_state) == (1300, 420, 420)
    assert est.total == 4 * 220 + 12 * 105 == 2140
    assert est.trainable_params == 105
    assert est.ratio == pytest.approx(2140 / 5200)
    assert est.bytes_per_param == pytest.approx(2140 / 325)


def test_step_in_backward_keeps_only_the_largest_gradient(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, [], OptimConfig(name="sgd", momentum=0.0, step_in_backward=True))
    assert est.step_in_backward
    assert est.gradients == 200 * 4  # 0.weight is the largest tensor
    assert est.total == 4 * N + 800
    frozen = estimate_memory(mlp, FIRST_LAYER, OptimConfig(name="sgd", momentum=0.9, step_in_backward=True))
    assert frozen.gradients == 100 * 4  # now 2.weight
    assert frozen.optimizer_state == 105 * 4
    assert frozen.adamw_total == 16 * N  # the baseline never steps in backward


def test_buffers_count_as_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    # params: 12 + 4 + 4 + 4 = 24; buffers: running_mean/var 2 * 4 * 4 B + num_batches_tracked 8 B
    est = estimate_memory(model, [], OptimConfig(name="sgd", momentum=0.9))
    assert est.weights == 24 * 4 + 40
    assert est.total == 24 * 12 + 40
    assert est.adamw_total == 24 * 16 + 40
    assert est.bytes_per_param == pytest.approx((24 * 12 + 40) / 24)


def test_half_precision_parameters_use_their_element_size(mlp: nn.Module) -> None:
    est = estimate_memory(mlp.half(), [], OptimConfig(name="sgd", momentum=0.9))
    assert (est.weights, est.total, est.adamw_total) == (2 * N, 6 * N, 8 * N)


@pytest.mark.parametrize(
    ("name", "momentum", "slots"),
    [
        ("sgd", 0.9, 1),
        ("sgd", 0.0, 0),
        ("nesterov", 0.9, 1),
        ("SGD", 0.9, 1),
        ("adamw", 0.9, 2),
        ("adam", 0.0, 2),
        ("lamb", 0.9, 2),
        ("lars", 0.9, 1),
        ("lion", 0.9, 1),
        ("rmsprop", 0.9, 2),
        ("rmsprop", 0.0, 1),
        ("adan", 0.9, 4),
        ("lookahead_adamw", 0.9, 3),
        ("fusedadamw", 0.9, 2),
        ("something_new", 0.9, 2),  # unknown: assumed Adam-like
    ],
)
def test_optimizer_state_slots(name: str, momentum: float, slots: int) -> None:
    assert state_slots(OptimConfig(name=name, momentum=momentum)) == slots


def test_lamb_bytes(mlp: nn.Module) -> None:
    assert estimate_memory(mlp, [], OptimConfig(name="lamb")).total == 16 * N


def test_activations_field_is_part_of_total_and_extensible(mlp: nn.Module) -> None:
    est = estimate_memory(mlp, [], OptimConfig())
    assert est.activations == 0
    assert est.total == est.weights + est.gradients + est.optimizer_state + est.activations
    assert [f.name for f in dataclasses.fields(MemoryEstimate)][:8] == [
        "weights",
        "gradients",
        "optimizer_state",
        "total",
        "adamw_total",
        "ratio",
        "bytes_per_param",
        "step_in_backward",
    ]


def test_no_parameters() -> None:
    est = estimate_memory(nn.ReLU(), [], OptimConfig())
    assert (est.total, est.ratio, est.bytes_per_param) == (0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (10, "10 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (12595, "12.3 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (int(1.83 * 2**30), "1.83 GiB"),
        (2**20 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (2**30 - 1, "1.00 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


# --------------------------------------------------------------------------- measured activations


def test_saved_activations_of_an_mlp_match_a_hand_count(mlp: nn.Module) -> None:
    from ftsgd.inspect.memory import measure_activations

    # Linear(10, 20) saves its input (B x 10) for the weight gradient, ReLU its output (B x 20), and
    # Linear(20, 5) that same output as its input: one storage, counted once. Weights are not counted.
    for batch in (1, 2, 7):
        m = measure_activations(mlp, (10,), batch)
        assert m.bytes == batch * (10 + 20) * 4, batch
        assert (m.batch_size, m.input_size) == (batch, (10,))
    # First layer frozen: nothing before the ReLU needs a gradient, so only Linear(20, 5)'s input is saved.
    assert measure_activations(mlp, (10,), 7, frozen=FIRST_LAYER).bytes == 7 * 20 * 4
    assert all(p.requires_grad for p in mlp.parameters())  # the probe restored the flags


def test_activation_extrapolation_equals_a_direct_measurement() -> None:
    import timm

    from ftsgd.inspect.memory import measure_activations, saved_tensor_bytes

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3).train()
    extrapolated = measure_activations(model, (3, 32, 32), 6)
    assert "extrapolated" in extrapolated.method
    direct, _ = saved_tensor_bytes(model, torch.randn(6, 3, 32, 32))
    assert extrapolated.bytes == direct > 0
    checkpointed = measure_activations(model, (3, 32, 32), 6, grad_checkpointing=True)
    assert 0 < checkpointed.bytes < direct / 3  # only each block's input is kept
    assert model.grad_checkpointing is False


def test_activation_probe_leaves_batchnorm_statistics_and_modes_alone() -> None:
    import timm

    from ftsgd.inspect.memory import measure_activations

    model = timm.create_model("test_resnet", num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure_activations(model, (3, 32, 32), 4, frozen=["conv1.weight", "bn1.weight", "bn1.bias"])
    assert m.bytes > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(mod.training for mod in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for an allocator-level measurement")
def test_activation_measurement_matches_cuda_allocator() -> None:
    import timm

    from ftsgd.inspect.memory import measure_activations

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10).cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    out = model(x)
    held = torch.cuda.memory_allocated() - start - out.numel() * out.element_size()
    del out
    measured = measure_activations(model, (3, 224, 224), 8).bytes
    assert measured == pytest.approx(held, rel=0.05)


def test_estimate_includes_activations_in_both_totals(mlp: nn.Module) -> None:
    from ftsgd.inspect.memory import measure_activations

    act = measure_activations(mlp, (10,), 4)
    est = estimate_memory(mlp, [], OptimConfig(name="adamw"), activations=act)
    assert est.activations == act.bytes == 4 * 30 * 4
    assert est.total == 16 * N + act.bytes and est.adamw_total == est.total and est.ratio == 1.0
    assert (est.batch_size, est.input_size) == (4, (10,))


def test_inspect_reports_measured_activations() -> None:
    import json

    from typer.testing import CliRunner

    from ftsgd.cli.app import app

    args = ["inspect", "test_vit", "--set", "model.kwargs={img_size=32}", "--img-size", "32", "--json"]
    runner = CliRunner()
    one = json.loads(runner.invoke(app, [*args, "--batch-size", "1"]).stdout)["memory"]
    eight = json.loads(runner.invoke(app, [*args, "--batch-size", "8"]).stdout)["memory"]
    assert (one["batch_size"], one["input_size"], eight["batch_size"]) == (1, [3, 32, 32], 8)
    assert 0 < one["activations"] < eight["activations"]
    assert (
        eight["total"]
        == eight["weights"] + eight["gradients"] + eight["optimizer_state"] + eight["activations"]
    )
    lowmem = json.loads(runner.invoke(app, [*args, "-b", "8", "--recipe", "sgd-freeze-embed-lowmem"]).stdout)
    assert lowmem["memory"]["activations"] < eight["activations"] / 3  # gradient checkpointing
    assert lowmem["memory"]["total"] < eight["total"]
    default = json.loads(runner.invoke(app, args).stdout)["memory"]  # the recipe's micro-batch
    assert default["batch_size"] == 32
    plain = runner.invoke(app, [*args[:-1], "-b", "4"])
    assert plain.exit_code == 0 and "activations (batch 4, 3x32x32)" in plain.stdout


def test_inspect_activation_probe_failure_is_explained() -> None:
    from typer.testing import CliRunner

    from ftsgd.cli.app import app

    # test_vit3 is built for exactly one input size (no dynamic_img_size)
    result = CliRunner().invoke(
        app, ["inspect", "test_vit3", "--set", "model.kwargs={img_size=32}", "--img-size", "48"]
    )
    assert result.exit_code == 2  # found with the recipe's problems, before the model is measured
    text = " ".join(result.stderr.split())
    assert (
        "data.img_size: test_vit3 cannot take 48x48 px input" in text
        and "model.kwargs = {img_size = N}" in text
    )


def test_bf16_weights_halve_weights_and_gradients_but_not_the_adamw_baseline(mlp: nn.Module) -> None:
    """train.weight_dtype = "bf16": 2-byte weights, gradients and SGD momentum, a float32 baseline."""
    sgd = OptimConfig(name="sgd", momentum=0.9)
    fp32 = estimate_memory(mlp, [], sgd)
    bf16 = estimate_memory(mlp.to(torch.bfloat16), [], sgd)
    assert (bf16.weights, bf16.gradients, bf16.optimizer_state) == (2 * N, 2 * N, 2 * N)
    assert bf16.adamw_total == fp32.adamw_total == 16 * N
    kahan = estimate_memory(mlp, [], dataclasses.replace(sgd, momentum=0.0, update_rounding="kahan"))
    assert kahan.optimizer_state == 2 * N  # the bf16 compensation buffer
    floor = estimate_memory(mlp, FIRST_LAYER, dataclasses.replace(sgd, momentum=0.0, step_in_backward=True))
    assert floor.weights == 2 * N and floor.optimizer_state == 0 and floor.gradients == 2 * 100  # largest


@pytest.mark.parametrize(
    ("optim", "per_param"),
    [
        (OptimConfig(name="sgd", lr=0.1, momentum=0.9), 2),  # bf16 momentum
        (OptimConfig(name="sgd", lr=0.1, momentum=0.9, update_rounding="nearest"), 2),
        (
            OptimConfig(name="sgd", lr=0.1, momentum=0.9, update_rounding="kahan"),
            4 + 2,
        ),  # fp32 + compensation
        (OptimConfig(name="sgd", lr=0.1, momentum=0.0, update_rounding="kahan"), 2),
        (OptimConfig(name="adamw", lr=0.1), 8),  # two float32 moments
    ],
)
def test_bf16_state_estimate_is_what_the_rounded_optimizer_allocates(
    mlp: nn.Module, optim: OptimConfig, per_param: int
) -> None:
    from ftsgd.model.optim import build_optimizer
    from ftsgd.model.rounding import RoundingStream

    model = mlp.to(torch.bfloat16)
    opt = build_optimizer(model, optim, stream=RoundingStream.for_model(model, 0))
    model(torch.randn(4, 10, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    held = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    assert held == estimate_memory(model, [], optim).optimizer_state == per_param * N


def test_inspect_estimates_the_bf16_recipe() -> None:
    import json

    from typer.testing import CliRunner

    from ftsgd.cli.app import app

    args = [
        "inspect",
        "test_vit",
        "--set",
        "model.kwargs={img_size=32}",
        "--img-size",
        "32",
        "-b",
        "2",
        "--json",
    ]
    runner = CliRunner()
    lowmem = json.loads(runner.invoke(app, [*args, "--recipe", "sgd-freeze-embed-lowmem"]).stdout)["memory"]
    result = runner.invoke(app, [*args, "--recipe", "sgd-freeze-embed-bf16"])
    assert result.exit_code == 0, result.output
    bf16 = json.loads(result.stdout)["memory"]
    assert bf16["weights"] * 2 == lowmem["weights"]
    # the baseline is float32 AdamW whatever the recipe holds its weights in (plus the activations)
    assert bf16["adamw_total"] - bf16["activations"] == lowmem["adamw_total"] - lowmem["activations"]
    assert 0 < bf16["activations"] < lowmem["activations"]  # measured in bf16
    assert bf16["ratio"] < lowmem["ratio"]
