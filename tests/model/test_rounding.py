"""bf16 weights updated with stochastic rounding, Kahan compensation or nearest rounding (ftsgd.model.rounding)."""

from __future__ import annotations

import pytest
import timm
import torch

from ftsgd.model.optim import StepInBackward, build_optimizer, set_lr
from ftsgd.model.rounding import RoundedAdamW, RoundedSGD, RoundingStream, stochastic_round_
from ftsgd.recipe.schema import OptimConfig

ULP_AT_1 = 2.0**-7  # bf16 spacing in [1, 2)


def test_stochastic_rounding_is_right_in_expectation_and_lands_on_a_neighbour() -> None:
    """Many draws of one value average to it; each draw is one of the two bf16 values around it."""
    value = 1.0 + 0.3 * ULP_AT_1  # 30% of the way from 1 to the next bf16 value
    source = torch.full((200_000,), value, dtype=torch.float32)
    target = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + ULP_AT_1}
    assert target.double().mean().item() == pytest.approx(value, abs=ULP_AT_1 * 0.005)
    negative = torch.full((200_000,), -value)
    stochastic_round_(target, negative, torch.Generator().manual_seed(1))
    assert target.double().mean().item() == pytest.approx(-value, abs=ULP_AT_1 * 0.005)
    exact = torch.tensor([1.0, -2.5, 0.0])  # values bf16 holds exactly never move
    out = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_(out, exact.clone(), torch.Generator().manual_seed(2))
    assert out.float().tolist() == [1.0, -2.5, 0.0]


def test_many_draws_of_one_sgd_update_average_to_the_fp32_update() -> None:
    weight = torch.full((50_000,), 1.0 + 0.5 * ULP_AT_1, dtype=torch.bfloat16).float().bfloat16()
    start = weight.float().clone()
    param = torch.nn.Parameter(weight.clone())
    param.grad = torch.full_like(param, 0.37)
    RoundedSGD([param], lr=0.01, rounding="stochastic", stream=RoundingStream(seed=3)).step()
    expected = start - 0.01 * 0.37  # about half a bf16 step
    assert param.double().mean().item() == pytest.approx(expected.double().mean().item(), abs=ULP_AT_1 * 0.01)


def _tiny_updates(rounding: str, steps: int = 300) -> torch.Tensor:
    """``steps`` SGD steps of -1e-4 (an eightieth of a bf16 step at 1.0) on 4096 weights at 1.0."""
    param = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    stream = RoundingStream(seed=0, index={id(param): 0})
    opt = RoundedSGD([param], lr=1e-3, rounding=rounding, stream=stream)
    for step in range(steps):
        stream.step = step
        param.grad = torch.full_like(param, 0.1)
        opt.step()
    return param.detach().float()


def test_tiny_updates_are_lost_by_nearest_rounding_and_kept_by_stochastic_and_kahan() -> None:
    target = 1.0 - 300 * 1e-3 * torch.tensor(0.1).bfloat16().item()  # ~0.97 (the gradient is bf16)
    assert torch.all(_tiny_updates("nearest") == 1.0)  # every update rounded away
    # a random walk of 300 roundings per weight: its mean over 4096 weights is within ~2e-4 (1 sigma)
    assert _tiny_updates("stochastic").double().mean().item() == pytest.approx(target, abs=6e-4)
    kahan = _tiny_updates("kahan")
    assert torch.all((kahan - target).abs() <= ULP_AT_1 / 2)  # exact up to the weight's own rounding


def test_rounding_is_a_pure_function_of_seed_step_and_parameter() -> None:
    """Two optimizers (two processes, or a run and its resume) draw the same bits for the same step."""

    def once(seed: int, step: int) -> torch.Tensor:
        param = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
        stream = RoundingStream(seed=seed, step=step, index={id(param): 5})
        param.grad = torch.full_like(param, 0.2)
        RoundedSGD([param], lr=1e-2, stream=stream).step()
        return param.detach().clone()

    assert torch.equal(once(0, 7), once(0, 7))
    assert not torch.equal(once(0, 7), once(0, 8)) and not torch.equal(once(0, 7), once(1, 7))


def _bf16_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, num_classes=3).to(torch.bfloat16)


def _train(model: torch.nn.Module, opt, stream: RoundingStream, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        stream.step = step
        set_lr([opt], 0.05)
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_step_in_backward_gives_the_weights_of_the_normal_step(rounding: str) -> None:
    cfg = OptimConfig(name="sgd", lr=0.05, momentum=0.9, update_rounding=rounding)
    normal, inside = _bf16_vit(), _bf16_vit()
    s1, s2 = RoundingStream.for_model(normal, 0), RoundingStream.for_model(inside, 0)
    _train(normal, build_optimizer(normal, cfg, stream=s1), s1)
    sib = build_optimizer(inside, OptimConfig(**{**cfg.__dict__, "step_in_backward": True}), stream=s2)
    assert isinstance(sib, StepInBackward)
    _train(inside, sib, s2)
    for a, b in zip(normal.parameters(), inside.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize(
    ("cfg", "dtype"),
    [
        (OptimConfig(name="sgd", lr=0.05, momentum=0.9), torch.bfloat16),
        (OptimConfig(name="sgd", lr=0.05, momentum=0.9, update_rounding="nearest"), torch.bfloat16),
        (OptimConfig(name="sgd", lr=0.05, momentum=0.9, update_rounding="kahan"), torch.float32),
        (OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), torch.float32),
    ],
)
def test_state_keeps_its_dtype_through_a_checkpoint(cfg: OptimConfig, dtype: torch.dtype) -> None:
    """SGD momentum beside bf16 weights is bf16 (Kahan: float32), AdamW's moments float32; torch's
    load_state_dict casts float state to the parameter's dtype, the rounded optimizers keep what was saved."""
    model = _bf16_vit()
    stream = RoundingStream.for_model(model, 0)
    opt = build_optimizer(model, cfg, stream=stream)
    assert isinstance(opt, RoundedSGD | RoundedAdamW)
    _train(model, opt, stream, steps=2)
    again = type(opt)(opt.param_groups, lr=0.05, stream=stream)
    again.load_state_dict(opt.state_dict())
    saved = [v for s in opt.state.values() for k, v in s.items() if k not in ("step", "compensation")]
    loaded = [v for s in again.state.values() for k, v in s.items() if k not in ("step", "compensation")]
    assert {v.dtype for v in saved} == {v.dtype for v in loaded} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))


def test_bf16_momentum_is_rounded_stochastically_and_right_in_expectation() -> None:
    """Beside bf16 weights the momentum buffer is bf16 (MOMENTUM_DTYPE). After two steps of gradient 1 it
    holds 0.9 + 1 = 1.9, between the bf16 neighbours 1.8984375 and 1.90625: each buffer element lands on
    one of them, at random, and their mean is 1.9 (round-to-nearest would give 1.8984375 everywhere)."""
    n = 20_000
    param = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    opt = RoundedSGD([param], lr=0.0, momentum=0.9)
    for step in range(2):
        opt.stream.step = step
        param.grad = torch.ones(n, dtype=torch.bfloat16)
        opt.step()
    buf = opt.state[param]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16
    assert set(buf.float().unique().tolist()) == {1.8984375, 1.90625}
    assert buf.float().mean().item() == pytest.approx(0.9 + 1.0, abs=1e-4)


def test_adamw_update_matches_torch_in_float32() -> None:
    """The rounded AdamW is torch's AdamW: on float32 weights (written back as they are) they agree."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = RoundedAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for i in range(5):
        grad = torch.randn(64, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bf16_model_starts_from_the_float32_initialisation_rounded(seed: int) -> None:
    """Truncated-normal draws made in bf16 rounded uniforms near the ends to +-1 (erfinv: inf, clamped to the
    bound +-2): new classifiers started with weights of +-2 where float32 has +-0.05. Drawn in float32 now."""
    from ftsgd.model.build import build_model
    from ftsgd.recipe.schema import ModelConfig

    cfg = ModelConfig(name="test_vit", kwargs={"img_size": 32})
    torch.manual_seed(seed)
    fp32, _ = build_model(cfg, num_classes=64)
    torch.manual_seed(seed)
    bf16, _ = build_model(cfg, num_classes=64, dtype=torch.bfloat16)
    assert bf16.head.weight.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert torch.allclose(bf16.head.weight.float(), fp32.head.weight, rtol=8e-3, atol=1e-5)  # bf16 steps
    assert bf16.head.weight.abs().max() < 0.1
    assert "float32_draws" not in torch.Tensor.uniform_.__qualname__  # the float32 draws end with the build
    assert "float32_draws" not in torch.Tensor.erfinv_.__qualname__


def test_a_checkpoint_with_a_float32_momentum_buffer_resumes_with_it() -> None:
    """Runs checkpointed when the buffer beside bf16 weights was float32 keep a float32 buffer on resume."""
    model = _bf16_vit()
    stream = RoundingStream.for_model(model, 0)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9), stream=stream)
    _train(model, opt, stream, steps=1)
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["momentum_buffer"] = state["momentum_buffer"].float()
    again = type(opt)(opt.param_groups, lr=0.05, momentum=0.9, stream=stream)
    again.load_state_dict(saved)
    _train(model, again, stream, steps=1)
    assert {s["momentum_buffer"].dtype for s in again.state.values()} == {torch.float32}
