"""Building a model in a low-precision dtype (bf16 weights) without a float32 copy and without the bf16
initialisation's outliers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["default_dtype", "float32_draws"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block (nothing when None), restored afterwards.

    A model built in bfloat16 still draws its random initialisation in float32, then rounds it
    (:func:`float32_draws`).
    """
    if dtype is None:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with float32_draws():
            yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def float32_draws() -> Iterator[None]:
    """Random initialisation of bf16/fp16 tensors computed in float32, then rounded.

    Truncated-normal initialisers (timm's and torch's ``trunc_normal_``) draw ``uniform_`` into the tensor
    and apply ``erfinv_`` to it. In bf16 every draw within 0.4% of the interval's ends rounds to +-1, whose
    erfinv is infinite and is clamped to the truncation bound: a new classifier got weights of +-2 where
    float32 gives +-0.05, and trained worse. Inside the block ``uniform_`` draws in float32 (the same
    random numbers as a float32 model, so a bf16 model starts from the float32 initialisation rounded) and
    ``erfinv_`` of a tensor just drawn uses those float32 values.
    """
    low = (torch.bfloat16, torch.float16)
    plain_uniform, plain_erfinv = torch.Tensor.uniform_, torch.Tensor.erfinv_
    # the latest draw only: (data_ptr, version after the draw, its float32 values)
    last: list[tuple[int, int, torch.Tensor]] = []

    def uniform_(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        last.clear()
        if self.dtype not in low:
            return plain_uniform(self, *args, **kwargs)
        values = plain_uniform(
            torch.empty(self.shape, dtype=torch.float32, device=self.device), *args, **kwargs
        )
        self.copy_(values)
        last.append((self.data_ptr(), self._version, values))
        return self

    def erfinv_(self: torch.Tensor) -> torch.Tensor:
        drawn = last.pop() if last else None
        if drawn is None or drawn[:2] != (self.data_ptr(), self._version) or self.dtype not in low:
            return plain_erfinv(self)  # not the tensor just drawn, or changed since
        return self.copy_(drawn[2].erfinv_())

    torch.Tensor.uniform_, torch.Tensor.erfinv_ = uniform_, erfinv_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.uniform_, torch.Tensor.erfinv_ = plain_uniform, plain_erfinv  # type: ignore[method-assign]
