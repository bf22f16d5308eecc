"""2-D convolution with its backward pass derived as the linear layer's is."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.nn import functional as F

from manual_grad.functions._fast_apply import fast_apply


@fast_apply
class Conv2dFunction(Function):
    r"""y = conv2d(x, W) + b, read as a linear layer applied at every position.

    Cut x (N, C, H, W) into its receptive-field columns, cols = unfold(x):
    (N, C kh kw, L) with L = H_out W_out positions. Then for each group
    (G groups, weight W (O, C/G, kh, kw) flattened to (G, O/G, C/G kh kw)):
        y[n, :, l] = W cols[n, :, l] + b        one linear layer per (sample, position)
    so, exactly as for the linear layer, with g = dL/dy flattened to (N, O, L):
        dL/dW = sum over n and l of g[n, :, l] cols[n, :, l]^T    (batch AND positions)
        dL/dcols = W^T g,   dL/dx = fold(dL/dcols)   (fold adds overlapping windows back)
        dL/db = sum over n and l of g[n, :, l]
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, W, b, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              W if ctx.needs_input_grad[0] else None)
        ctx.x_shape, ctx.w_shape = x.shape, W.shape

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, W = ctx.saved_tensors
        N, C, H, Wd = ctx.x_shape
        Out, Cg, kh, kw = ctx.w_shape
        G = ctx.groups
        unfold = {"kernel_size": (kh, kw), "dilation": ctx.dilation, "padding": ctx.padding,
                  "stride": ctx.stride}
        L = g.shape[2] * g.shape[3]
        g_cols = g.reshape(N, G, Out // G, L)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            Wg = W.reshape(G, Out // G, Cg * kh * kw)
            d_cols = torch.einsum("gok,ngol->ngkl", Wg, g_cols)  # W^T g per group
            grad_x = F.fold(d_cols.reshape(N, C * kh * kw, L), (H, Wd), **unfold)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, **unfold).reshape(N, G, Cg * kh * kw, L)
            grad_W = torch.einsum("ngol,ngkl->gok", g_cols, cols).reshape(Out, Cg, kh, kw)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_W, grad_b, None, None, None, None
