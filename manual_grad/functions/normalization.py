"""Normalisation layers with their backward passes derived by hand."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply


def batch_stats(x: Tensor, dims: tuple[int, ...],
                correction: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(var, mean, x - mean) over ``dims`` (kept as size 1), in two passes: the mean, then
    the mean squared deviation from it. torch.var_mean's one-pass kernel is ~15x slower
    on the CPU when ``dims`` are a batch's N, H, W (2.2 ms against 0.15 ms for 64 x 16 x
    28 x 28), and the centred x is wanted next anyway."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    count = x.numel() // max(mean.numel(), 1)
    var = centred.square().sum(dims, keepdim=True) / max(count - correction, 1)
    return var, mean, centred


def _normalize_backward(g: Tensor, xhat: Tensor, rstd: Tensor, w: Tensor | None,
                        dims: tuple[int, ...]) -> Tensor:
    r"""dL/dx for xhat = (x - mean(x)) * rstd, mean and variance taken over ``dims``.

    With dxhat = g w (or g), each of the m normalised values moves the mean and the
    variance, which gives the three-term formula:
        dL/dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    """
    dxhat = g * w if w is not None else g
    return rstd * (dxhat - dxhat.mean(dims, keepdim=True)
                   - xhat * (dxhat * xhat).mean(dims, keepdim=True))


@fast_apply
class LayerNormFunction(Function):
    r"""y = (x - mean) / sqrt(var + eps) * w + b over the last k dims (normalized_shape).

    Shapes: x (*, *normalized_shape), w and b normalized_shape. With xhat the
    normalised x, rstd = 1 / sqrt(var + eps) and g = dL/dy:
        dL/dx = rstd (g w - mean(g w) - xhat mean(g w xhat))   means over the last k dims
        dL/dw = sum over the batch dims of g xhat
        dL/db = sum over the batch dims of g
    mean and rstd are recomputed from the saved x in backward, so it stays differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: int, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
        dims = tuple(range(-k, 0))
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
        if w is not None:
            y = y * w
        return y + b if b is not None else y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, ctx.k, w, _, ctx.eps = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dims = tuple(range(-ctx.k, 0))
        batch_dims = tuple(range(x.dim() - ctx.k))
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + ctx.eps)
        xhat = (x - mean) * rstd
        grad_x = _normalize_backward(g, xhat, rstd, w, dims) if ctx.needs_input_grad[0] else None
        grad_w = (g * xhat).sum(batch_dims) if ctx.needs_input_grad[2] else None
        grad_b = g.sum(batch_dims) if ctx.needs_input_grad[3] else None  # False without bias
        return grad_x, None, grad_w, grad_b, None


@fast_apply
class BatchNormFunction(Function):
    r"""y = (x - mean_c) / sqrt(var_c + eps) * w_c + b_c per channel c (dim 1).

    x (N, C) or (N, C, *). In training the statistics are the batch's, over every dim
    but the channel (m values each), and depend on x; in eval they are the running
    ones, constants. With centred = x - mean, rstd = 1 / sqrt(var + eps),
    xhat = centred rstd and s = w rstd (the scale each value gets):
        training:  dL/dx = rstd (g w - mean(g w) - xhat mean(g w xhat))  means per channel
                         = s g - s sum(g) / m - centred s rstd^2 sum(g centred) / m
        eval:      dL/dx = s g
        both:      dL/dw = sum of g xhat = rstd sum(g centred);   dL/db = sum of g
    The second form needs only two per-channel sums, sum(g) and sum(g centred), so
    backward makes two full-size tensors where the first form makes a dozen (each a
    fresh allocation, slow on a CPU at this size). The running statistics are updated
    outside, in functional.batch_norm.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor | None,
                var: Tensor | None, eps: float) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if mean is None:  # batch statistics
            var, _, centred = batch_stats(x, (0, *range(2, x.dim())))
        else:
            var, centred = var.view(shape), x - mean.view(shape)
        scale = torch.rsqrt(var + eps)
        if w is not None:
            scale = scale * w.view(shape)
        y = centred.mul_(scale)  # (forward runs without autograd: centred is ours)
        return y.add_(b.view(shape)) if b is not None else y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, w, _, mean, var, ctx.eps = inputs
        ctx.save_for_backward(x, w, mean, var)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, mean, var = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = (0, *range(2, x.dim()))
        if mean is None:
            var_, _, centred = batch_stats(x, dims)
        else:
            var_, centred = var.view(shape), x - mean.view(shape)
        rstd = torch.rsqrt(var_ + ctx.eps)
        s = rstd * w.view(shape) if w is not None else rstd
        g_sum = g.sum(dims, keepdim=True)
        gc_sum = (g * centred).sum(dims, keepdim=True) if (
            ctx.needs_input_grad[1] or (ctx.needs_input_grad[0] and mean is None)) else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mean is None:
                m = x.numel() // g_sum.numel()
                grad_x = torch.addcmul(s * g_sum / -m, g, s)  # s g - s sum(g) / m
                grad_x = grad_x.addcmul_(centred, s * rstd.square() * gc_sum / -m)
            else:
                grad_x = g * s
        grad_w = (rstd * gc_sum).view(-1) if ctx.needs_input_grad[1] else None
        grad_b = g_sum.view(-1) if ctx.needs_input_grad[2] else None  # False without bias
        return grad_x, grad_w, grad_b, None, None, None
