"""The seed's whole computation, linear -> ReLU -> MSE, with its gradients in one pass.

Autograd runs a forward pass over the inputs and then a backward pass over them again:
for the seed's 50,000 x 784 images (157 MB in float32, far more than any cache) that is
two trips through memory, and on a CPU those trips are most of the time. But every row's
gradient depends only on that row, so the gradients can be summed while the rows are
still in cache: here they are computed during the forward pass, a few thousand rows at a
time, and backward only scales them by the incoming gradient.
"""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply
from manual_grad.functions.activations import relu_mask
from manual_grad.functions.linear import affine

CHUNK_BYTES = 4 << 20  # rows per chunk: ~4 MB of input, which stays in a CPU's cache


def _scale(reduction: str, numel: int) -> float:
    """dC/dd^2 per element: 1/n for 'mean' (n elements), 1 for 'sum'. (An empty batch has
    an empty gradient, not a division by zero.)"""
    return 1.0 / max(numel, 1) if reduction == "mean" else 1.0


def _reduce(total: Tensor, reduction: str, numel: int) -> Tensor:
    """The loss from the sum of squares; the mean of nothing is NaN, as in torch."""
    return total / numel if reduction == "mean" else total


@fast_apply
class LinearReLUMSELossFunction(Function):
    r"""C = reduce((max(0, x W^T + b) - y)^2): the seed's network and loss in one call.

    Shapes::

        x: (n, in)   W: (out, in)   b: (out,) or None   y: (n, out)   C: a scalar

    With u = max(0, z), z = x W^T + b, d = u - y and s = 1/(n out) ('mean') or 1 ('sum'),
    for C's gradient g (a scalar), row by row:

        dC/du = 2 s d g        dC/dz = dC/du * (u > 0)        (through the ReLU)
        dC/dW = dC/dz^T x      dC/db = sum of dC/dz over rows
        dC/dx = dC/dz W        dC/dy = -dC/du

    ``forward`` (when ``with_grads`` says which of x, W, b, y will need gradients) sums
    these for g = 1 chunk by chunk, while each chunk of x is in cache, and returns them
    as extra outputs; ``backward`` multiplies them by g. When a graph of the backward
    itself is wanted (double backward), or they were not computed (inside torch.func
    transforms and torch.compile), ``backward`` recomputes the same lines from x, W, b, y
    with differentiable ops.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None, y: Tensor, reduction: str,
                with_grads: tuple[bool, bool, bool, bool] | None) -> tuple[Tensor | None, ...]:
        if with_grads is None:  # the loss only; backward will recompute
            d = affine(x, W, b).clamp_min_(0.0) - y
            return _reduce(d.square().sum(), reduction, d.numel()), None, None, None, None
        need_x, need_W, need_b, need_y = with_grads
        s2 = 2.0 * _scale(reduction, y.numel())
        total = x.new_zeros(())
        grad_W = torch.zeros_like(W) if need_W else None
        grad_b = torch.zeros_like(b) if need_b and b is not None else None
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = torch.empty_like(y) if need_y else None
        rows = len(x) if x.device.type != "cpu" else \
            max(1, CHUNK_BYTES // max(1, x.shape[1] * x.element_size()))
        for start in range(0, len(x), rows):
            xc, yc = x[start : start + rows], y[start : start + rows]
            u = affine(xc, W, b).clamp_min_(0.0)
            d = u - yc
            total += d.square().sum()
            grad_u = d * s2  # dC/du for g = 1
            grad_z = grad_u * relu_mask(u)
            if grad_W is not None:
                grad_W.addmm_(grad_z.t(), xc)  # += dC/dz^T x, this chunk's rows
            if grad_b is not None:
                grad_b += grad_z.sum(0)
            if grad_x is not None:
                torch.mm(grad_z, W, out=grad_x[start : start + rows])
            if grad_y is not None:
                torch.neg(grad_u, out=grad_y[start : start + rows])
        return _reduce(total, reduction, y.numel()), grad_x, grad_W, grad_b, grad_y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, W, b, y, reduction, with_grads = inputs
        _, *grads = output
        ctx.mark_non_differentiable(*(t for t in grads if t is not None))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, W, b, y, *grads)
        ctx.reduction, ctx.precomputed = reduction, with_grads is not None

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        x, W, b, y, *grads = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if g is None or not any(need):
            return None, None, None, None, None, None
        if (ctx.precomputed and not torch.is_grad_enabled()
                and all(t is not None for t, wanted in zip(grads, need, strict=True) if wanted)):
            # each gradient was summed for g = 1 in forward: scale it (a scalar product)
            return (*(t * g if t is not None and wanted else None
                      for t, wanted in zip(grads, need, strict=True)), None, None)
        # the same lines, from the saved inputs, with ops autograd can differentiate again
        u = affine(x, W, b).clamp_min(0.0)
        grad_u = (u - y) * (2.0 * _scale(ctx.reduction, y.numel()) * g)
        grad_z = grad_u * relu_mask(u)
        grad_x = grad_z @ W if need[0] else None
        grad_W = grad_z.t() @ x if need[1] else None
        grad_b = grad_z.sum(0) if need[2] else None
        grad_y = -grad_u if need[3] else None
        return grad_x, grad_W, grad_b, grad_y, None, None
