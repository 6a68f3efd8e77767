"""Optimizer construction and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ftsgd.model.optim import create_optimizer, lr_at, param_groups, set_lr
from ftsgd.recipe.schema import OptimConfig, ScheduleConfig


def test_only_trainable_parameters_reach_the_optimizer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = create_optimizer(param_groups(model, OptimConfig()), OptimConfig())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == 2
    assert all(p.requires_grad for p in params)


def test_weight_decay_skips_bias_and_norm_unless_asked() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = param_groups(model, OptimConfig(weight_decay=0.01))
    by_wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert by_wd == {0.01: 16 + 8, 0.0: 4 + 4 + 4 + 2}
    all_decay = param_groups(model, OptimConfig(weight_decay=0.01, decay_bias_and_norm=True))
    assert len(all_decay) == 1 and all_decay[0]["weight_decay"] == 0.01


def test_sgd_without_momentum_keeps_no_state() -> None:
    model = nn.Linear(4, 2)
    opt = create_optimizer(param_groups(model, OptimConfig(momentum=0.0)), OptimConfig(momentum=0.0))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(not s for s in opt.state.values())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is False


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)]
)
def test_named_optimizers(name: str, cls: type) -> None:
    cfg = OptimConfig(name=name, lr=0.1)
    opt = create_optimizer(param_groups(nn.Linear(2, 2), cfg), cfg)
    assert isinstance(opt, cls)
    assert opt.defaults["lr"] == 0.1


def test_timm_optimizer_by_name() -> None:
    cfg = OptimConfig(name="lamb", lr=0.01)
    opt = create_optimizer(param_groups(nn.Linear(2, 2), cfg), cfg)
    assert type(opt).__name__ == "Lamb"


def test_cosine_per_epoch_matches_torch_cosine_annealing() -> None:
    model = nn.Linear(2, 2)
    ref_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    sched = ScheduleConfig()
    for epoch in range(5):
        ours = lr_at(sched, 0.1, epochs=5, steps_per_epoch=7, epoch=epoch, step=3)
        assert ours == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12)
        ref_opt.step()
        ref.step()


def test_cosine_per_step_and_warmup() -> None:
    sched = ScheduleConfig(interval="step", warmup_epochs=1)
    # 4 steps per epoch: warmup covers steps 0..3 as lr*(t+1)/5
    assert [lr_at(sched, 1.0, epochs=3, steps_per_epoch=4, epoch=0, step=s) for s in range(4)] == [
        0.2,
        0.4,
        0.6,
        0.8,
    ]
    t = 6
    expected = 0.5 * (1 + math.cos(math.pi * t / 12))
    assert lr_at(sched, 1.0, epochs=3, steps_per_epoch=4, epoch=1, step=2) == pytest.approx(expected)


def test_constant_and_step_schedules() -> None:
    const = ScheduleConfig(name="constant")
    assert {lr_at(const, 0.3, epochs=9, steps_per_epoch=2, epoch=e) for e in range(9)} == {0.3}
    step = ScheduleConfig(name="step", decay_epochs=2, decay_rate=0.5)
    assert [lr_at(step, 1.0, epochs=6, steps_per_epoch=2, epoch=e) for e in range(6)] == [
        1,
        1,
        0.5,
        0.5,
        0.25,
        0.25,
    ]
    step_i = ScheduleConfig(name="step", interval="step", decay_epochs=1, decay_rate=0.1)
    assert lr_at(step_i, 1.0, epochs=3, steps_per_epoch=4, epoch=1, step=3) == pytest.approx(0.1)


def test_min_lr_is_the_floor_of_cosine() -> None:
    sched = ScheduleConfig(min_lr=0.01)
    assert lr_at(sched, 0.1, epochs=4, steps_per_epoch=1, epoch=0) == pytest.approx(0.1)
    assert lr_at(sched, 0.1, epochs=4, steps_per_epoch=1, epoch=2) == pytest.approx(0.055)


def test_set_lr_honours_lr_scale() -> None:
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=1.0)
    set_lr([opt], 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
