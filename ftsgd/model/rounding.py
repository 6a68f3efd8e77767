"""bfloat16 weights updated without losing small steps: stochastic rounding, Kahan compensation, or nearest.

A bf16 weight has 8 significant bits, so an SGD update smaller than half a bf16 step of the weight
(``lr x gradient`` usually is, late in fine-tuning) vanishes under round-to-nearest: pure bf16 training
stalls. The optimizers here compute each update in float32, one parameter at a time (the only float32
copy of a weight that ever exists is that parameter's, for the duration of its update), and write the
result back to bf16 in one of three ways (``optim.update_rounding``):

* ``stochastic``: round up or down with probability given by the remainder, so every update survives
  in expectation (Zamirai et al. 2020, "Revisiting BFloat16 Training"). :func:`stochastic_round_` adds
  16 random low bits to the float32 bit pattern and truncates them.
* ``kahan``: round to nearest and keep what was lost in a bf16 compensation buffer that the next update
  adds back: exact to ~16 more bits, at 2 more bytes per parameter.
* ``nearest``: plain round-to-nearest-even, for comparison (what the stall looks like).

The random bits of a parameter's rounding at a step come from a generator seeded with
``(train.seed, global step, parameter index)`` (:class:`RoundingStream`): a pure function of counters the
checkpoint already holds, so a run resumed after ``kill -9`` draws exactly the bits it would have drawn,
and every process of a torchrun job (which all see the same all-reduced gradient) rounds identically,
keeping the replicas equal without any communication.

torchao's bf16 optimizers were considered: they offer AdamW only (no SGD), draw from the global RNG
(one stream shared with dropout and differing per rank) and have no Kahan variant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftsgd.recipe.schema import ROUNDED_OPTIMIZERS

__all__ = [
    "MOMENTUM_DTYPE",
    "ROUNDED_OPTIMIZERS",
    "RoundedAdamW",
    "RoundedSGD",
    "RoundingStream",
    "stochastic_round_",
    "write_back_",
]

MOMENTUM_DTYPE: dict[str, torch.dtype] = {
    "stochastic": torch.bfloat16,
    "nearest": torch.bfloat16,
    "kahan": torch.float32,
}
"""dtype of SGD's momentum buffer beside bf16 weights, per ``optim.update_rounding``.

A bf16 buffer is rounded as the weights are (stochastically, or to nearest) and saves 2 bytes per
parameter. Measured against a float32 buffer on ``ftsgd demo --compare``'s task (docs/memory-bf16.md),
the stochastically rounded bf16 buffer cost no accuracy, so the lighter one is the choice. Kahan, the
exact option, keeps an exact (float32) buffer. AdamW's moments are float32 whatever the rounding."""

_LOW_BITS = 1 << 16


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write float32 ``source`` into bf16 ``target``, rounding each value up or down at random.

    A bf16 value is the upper 16 bits of a float32. Adding a uniform random integer in [0, 2^16) to the
    float32 bit pattern carries into bit 16 with probability (low 16 bits) / 2^16, i.e. the remainder's
    share of one bf16 step, so truncating afterwards rounds away from zero with exactly that probability:
    ``E[rounded] = source``. Sign-magnitude makes it symmetric for negative values. ``source`` is
    overwritten (its bit pattern is used as scratch space).
    """
    bits = source.view(torch.int32)
    noise = torch.randint(
        0, _LOW_BITS, source.shape, dtype=torch.int32, device=source.device, generator=generator
    )
    bits.add_(noise).bitwise_and_(-_LOW_BITS)  # -2^16 = 0xFFFF0000: keep the upper 16 bits
    target.copy_(source)  # exact: the low bits are zero


@dataclass
class RoundingStream:
    """Where the random bits of stochastic rounding come from: ``(seed, step, parameter index)``.

    Attributes:
        seed: ``train.seed``.
        step: The global optimizer step being applied; the trainer sets it before every step.
        index: Position of each parameter (by ``id``) in ``model.parameters()``: stable across runs,
            stages and processes, and the same for a normal optimizer and per-parameter ones.
    """

    seed: int = 0
    step: int = 0
    index: dict[int, int] = field(default_factory=dict)
    _generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, model: nn.Module, seed: int) -> RoundingStream:
        return cls(seed=seed, index={id(p): i for i, p in enumerate(model.parameters())})

    def generator(self, param: torch.Tensor, salt: int = 0) -> torch.Generator:
        """A generator on ``param``'s device seeded for this step and parameter (reseeded, not created anew).

        ``salt`` tells apart the roundings of one parameter at one step (the weight: 0, a bf16 momentum
        buffer: 1), so they draw independent bits.
        """
        device = str(param.device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=param.device)
        key = f"{self.seed}:{self.step}:{self.index.get(id(param), -1)}:{salt}".encode()
        gen.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return gen


def write_back_(
    param: torch.Tensor, value: torch.Tensor, state: dict[str, Any], mode: str, stream: RoundingStream
) -> None:
    """Store the updated float32 ``value`` into the bf16 ``param`` with ``mode`` rounding.

    ``kahan`` keeps the part of ``value`` that rounding lost in ``state["compensation"]`` (bf16), which
    :func:`_current` adds back before the next update. ``value`` is used as scratch space.
    """
    if param.dtype == torch.float32:
        param.copy_(value)
    elif mode == "stochastic":
        stochastic_round_(param, value, stream.generator(param))
    elif mode == "kahan":
        param.copy_(value)
        state["compensation"] = value.sub_(param).to(param.dtype)
    else:
        param.copy_(value)


def _current(param: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """The weight as float32, its Kahan compensation added back (a new tensor)."""
    value = param.detach().float()
    comp = state.get("compensation")
    return value.add_(comp) if comp is not None else value


class _Rounded(torch.optim.Optimizer):
    """What the rounded optimizers share: the rounding mode, the stream, and the per-parameter loop."""

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], rounding: str, stream: RoundingStream
    ):
        super().__init__(params, defaults)
        self.rounding, self.stream = rounding, stream

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep each state tensor's saved dtype: torch casts float state to the
        dtype of its parameter, which would turn float32 momentum and moments into bf16 on resume."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            state = self.state[params[int(index)]]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step" and state[key].dtype != value.dtype:
                    state[key] = value.to(device=state[key].device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    state = self.state[param]
                    value = self._update(param, param.grad.float(), _current(param, state), state, group)
                    write_back_(param, value, state, self.rounding, self.stream)
        return loss

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        raise NotImplementedError


class RoundedSGD(_Rounded):
    """``torch.optim.SGD``'s update (momentum, dampening 0, Nesterov, L2 weight decay) in float32 per
    parameter, written back with :func:`write_back_`. Beside bf16 weights the momentum buffer is
    :data:`MOMENTUM_DTYPE` of the rounding, rounded the same way; beside float32 weights it is float32."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        rounding: str = "stochastic",
        stream: RoundingStream | None = None,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        super().__init__(params, defaults, rounding, stream or RoundingStream())

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        if group["weight_decay"]:
            grad.add_(value, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                low = param.dtype == torch.bfloat16
                dtype = MOMENTUM_DTYPE[self.rounding] if low else torch.float32
                buf = state["momentum_buffer"] = torch.zeros_like(grad, dtype=dtype)
                new = grad.clone()
            else:
                new = buf.float().mul_(momentum).add_(grad)
            if buf.dtype == torch.float32 or self.rounding == "nearest":
                buf.copy_(new)
            else:
                stochastic_round_(buf, new.clone(), self.stream.generator(param, salt=1))
            new = buf.float()
            grad = grad.add_(new, alpha=momentum) if group["nesterov"] else new
        return value.add_(grad, alpha=-group["lr"])


class RoundedAdamW(_Rounded):
    """``torch.optim.AdamW``'s update (or Adam's with ``decoupled=False``) in float32 per parameter, float32
    moments, written back with :func:`write_back_`."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = True,
        rounding: str = "stochastic",
        stream: RoundingStream | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.decoupled = decoupled
        super().__init__(params, defaults, rounding, stream or RoundingStream())

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, state: dict, group: dict
    ) -> torch.Tensor:
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        step = int(state["step"].item())
        if wd and self.decoupled:
            value.mul_(1 - lr * wd)
        elif wd:
            grad.add_(value, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        return value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
