"""Linear layer, y = x W^T + b, with its backward pass derived by hand."""

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply, tangent_sum


def as_rows(t: Tensor) -> Tensor:
    """(*, k) -> (n, k), n the product of the leading dims (0 when one is 0; -1 would be
    ambiguous when k is 0). A view when possible; reshape, not view: t may be expanded
    or strided (e.g. g from .sum())."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def affine(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """x W^T + b for x of shape (*, in): one (addmm) product over the flattened rows."""
    if x.dim() == 2:  # the usual (n, in) batch: no reshapes
        return x @ W.t() if b is None else torch.addmm(b, x, W.t())
    rows = as_rows(x)  # (*, in) -> (n, in): a view when possible
    y = rows @ W.t() if b is None else torch.addmm(b, rows, W.t())
    return y.reshape(*x.shape[:-1], W.shape[0])


@fast_apply
class LinearFunction(Function):
    r"""y = x W^T + b, weight stored as in ``torch.nn.Linear``.

    Shapes::

        x: (*, in)   W: (out, in)   b: (out,) or None   y: (*, out)

    Every row of ``x`` goes through the layer on its own (batching never changes
    the math), so with g = dL/dy of shape (*, out) and x, g flattened to 2-D rows:

        dL/dx = g W                          (*, in)     one row per input row
        dL/dW = sum_i g_i^T x_i = g^T x      (out, in)   W is in every row: summed
        dL/db = sum_i g_i                    (out,)      b is in every row: summed

    ``backward`` computes exactly these three lines, each only when
    ``ctx.needs_input_grad`` asks for it, with differentiable torch ops on the
    saved inputs, so it can itself be differentiated (double backward).

    For complex tensors torch's gradient is dL/d(conj z), so W and x enter
    conjugated: dL/dx = g conj(W), dL/dW = g^T conj(x) (conj is a no-op for real ones).
    """

    # torch.func.vmap batches forward and backward as written: both use only torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        return affine(x, W, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, W, b = inputs
        needs_x, needs_W, _ = ctx.needs_input_grad
        # dL/dx needs only W and dL/dW needs only x: keep just what will be used.
        ctx.save_for_backward(x if needs_W else None, W if needs_x else None)
        ctx.save_for_forward(x, W)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, W = ctx.saved_tensors
        needs_x, needs_W, needs_b = ctx.needs_input_grad  # False for an absent bias
        grad_x = g @ W.conj() if needs_x else None  # (*, out) @ (out, in) -> (*, in)
        grad_W = grad_b = None
        if needs_W or needs_b:
            g_rows = as_rows(g)  # (n, out)
            if needs_W:
                x_rows = as_rows(x)  # (n, in)
                grad_W = g_rows.t() @ x_rows.conj()  # (out, n) @ (n, in)
            if needs_b:
                grad_b = g_rows.sum(0)  # (out,)
        return grad_x, grad_W, grad_b

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW: Tensor | None, db: Tensor | None) -> Tensor:
        """Forward mode, the product rule on y = x W^T + b:

            dy = dx W^T + x dW^T + db         (each term only for a tangent given)
        """
        x, W = ctx.saved_tensors
        return tangent_sum(None if dx is None else affine(dx, W, None),
                           None if dW is None else affine(x, dW, None), db,
                           shape=(*x.shape[:-1], W.shape[0]))
