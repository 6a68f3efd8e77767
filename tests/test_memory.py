"""Training-state memory estimate (ftsgd.memory): exact bytes on small models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ftsgd.memory import MemoryEstimate, estimate_memory, format_bytes, state_slots
from ftsgd.recipe import OptimConfig

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
