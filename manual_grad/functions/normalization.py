"""Normalisation layers with their backward passes derived by hand."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply


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
    but the channel, and depend on x; in eval they are the running ones, constants:
        training:  dL/dx = rstd (g w - mean(g w) - xhat mean(g w xhat))  means per channel
        eval:      dL/dx = rstd g w
        both:      dL/dw = sum over N and positions of g xhat;  dL/db = the same sum of g
    The running statistics are updated outside, in functional.batch_norm.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor | None,
                var: Tensor | None, eps: float) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if mean is None:  # batch statistics
            dims = (0, *range(2, x.dim()))
            batch_var, batch_mean = torch.var_mean(x, dims, correction=0, keepdim=True)
            y = (x - batch_mean) * torch.rsqrt(batch_var + eps)
        else:
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
        if w is not None:
            y = y * w.view(shape)
        return y + b.view(shape) if b is not None else y

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
            var_, mean_ = torch.var_mean(x, dims, correction=0, keepdim=True)
        else:
            var_, mean_ = var.view(shape), mean.view(shape)
        rstd = torch.rsqrt(var_ + ctx.eps)
        xhat = (x - mean_) * rstd
        wv = w.view(shape) if w is not None else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mean is None:
                grad_x = _normalize_backward(g, xhat, rstd, wv, dims)
            else:
                grad_x = g * rstd * wv if wv is not None else g * rstd
        grad_w = (g * xhat).sum(dims) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(dims) if ctx.needs_input_grad[2] else None  # False without bias
        return grad_x, grad_w, grad_b, None, None, None
