"""Loss functions with their backward passes derived by hand."""

from typing import Any

from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._signature import cache_forward_signature

REDUCTIONS = ("mean", "sum", "none")


@cache_forward_signature
class MSELossFunction(Function):
    r"""Mean squared error, as ``torch.nn.functional.mse_loss``.

    With d = u - y (u the prediction, y the target, n = number of elements):

        'none':  C_i = d_i^2          dC/du = 2 d * g      g: same shape as C
        'sum':   C = sum_i d_i^2      dC/du = 2 d * g      g: a scalar
        'mean':  C = 1/n sum_i d_i^2  dC/du = 2 d * g / n  g: a scalar
        and always dC/dy = -dC/du (summed back to y's shape if y was broadcast).

    The difference d is recomputed in ``backward`` from the saved u and y rather
    than saved itself, so that the backward stays differentiable (double backward).
    """

    # torch.func.vmap batches forward and backward as written: both use only torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        squared = (u - y).square()
        if reduction == "mean":
            return squared.mean()
        if reduction == "sum":
            return squared.sum()
        return squared

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        u, y, reduction = inputs
        ctx.save_for_backward(u, y)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None
        u, y = ctx.saved_tensors
        d = u - y  # broadcast shape; equals u's shape (functional.mse_loss checks)
        # max(.., 1): an empty batch has an empty gradient, not a division by zero.
        scale = 2.0 / max(d.numel(), 1) if ctx.reduction == "mean" else 2.0
        grad_d = (scale * d) * g
        grad_u = grad_d.sum_to_size(u.shape) if ctx.needs_input_grad[0] else None
        grad_y = (-grad_d).sum_to_size(y.shape) if ctx.needs_input_grad[1] else None
        return grad_u, grad_y, None
