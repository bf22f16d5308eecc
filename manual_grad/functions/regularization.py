"""Dropout with its backward pass derived by hand."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply


@fast_apply
class DropoutFunction(Function):
    r"""y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) drawn once per forward.

        dL/dx = g * m / (1 - p)

    The mask is kept as booleans (1 byte per element, a quarter of a float32 copy),
    the only thing the backward needs. p = 1 drops everything (y = 0, dL/dx = 0).
    """

    @staticmethod
    def forward(x: Tensor, p: float, inplace: bool = False) -> tuple[Tensor, Tensor]:
        keep = torch.rand_like(x) >= p
        scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
        y = x.mul_(keep).mul_(scale) if inplace else x * keep * scale
        return y, keep

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, p, inplace = inputs
        y, keep = output
        if inplace:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(keep)
        ctx.save_for_backward(keep)
        ctx.scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_keep: Tensor | None) -> tuple[Tensor | None, None, None]:
        (keep,) = ctx.saved_tensors
        return (g * keep * ctx.scale if ctx.needs_input_grad[0] else None), None, None
