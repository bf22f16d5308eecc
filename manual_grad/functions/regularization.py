"""Dropout with its backward pass derived by hand."""

from typing import Any

from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply


@fast_apply
class DropoutFunction(Function):
    r"""y = x * m * s, with m the mask of kept units (m_i ~ Bernoulli(1 - p), drawn by the
    caller, ``functional.dropout``) and s = 1 / (1 - p) the scale (0 when p = 1):

        dL/dx = g * m * s

    The mask is an input, not drawn here, so that the Function is pure: torch.func.vmap
    batches it with its own rule for random draws (``randomness='different'`` or
    ``'same'``), and there is one output, as autograd needs of a Function that
    overwrites an input that is a view. Only the boolean mask (1 byte per element, a quarter of a
    float32 copy) is kept for the backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, keep: Tensor, scale: float, inplace: bool = False) -> Tensor:
        return x.mul_(keep).mul_(scale) if inplace else x * keep * scale

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, keep, ctx.scale, inplace = inputs
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(keep)
        ctx.save_for_forward(keep)
        ctx.inplace = inplace

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        (keep,) = ctx.saved_tensors
        return (g * keep * ctx.scale if ctx.needs_input_grad[0] else None), None, None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, *_: Any) -> Tensor:
        """Forward mode: dy = dx * m * s, the same mask and scale."""
        (keep,) = ctx.saved_tensors
        return dx.mul_(keep).mul_(ctx.scale) if ctx.inplace else dx * keep * ctx.scale
