"""Element-wise activations with their backward passes derived by hand."""

from typing import Any

from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._signature import cache_forward_signature


@cache_forward_signature
class ReLUFunction(Function):
    r"""u = max(0, z), element-wise; any shape.

    du/dz is 1 where z > 0 and 0 where z < 0. At z == 0 the function has no
    derivative; like torch we use 0 there (the subgradient that keeps dead
    units dead). With g = dL/du, same shape as z:

        dL/dz = g * (u > 0)

    The mask is read from the *output* u, not the input z: u > 0 exactly where
    z > 0, so z need not be kept, and an in-place forward (which overwrites z)
    loses nothing the backward needs. A NaN in z stays NaN in u, and its
    gradient passes through as in torch (NaN <= 0 is false).
    """

    # torch.func.vmap batches forward and backward as written: both use only torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, inplace: bool = False) -> Tensor:
        return z.clamp_min_(0.0) if inplace else z.clamp_min(0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, inplace = inputs
        if inplace:
            ctx.mark_dirty(z)
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        (u,) = ctx.saved_tensors
        grad_z = g.masked_fill(u <= 0, 0.0) if ctx.needs_input_grad[0] else None
        return grad_z, None
