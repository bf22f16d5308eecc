"""2-D convolution with its backward pass derived as the linear layer's is."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.nn import functional as F

from manual_grad.functions._fast_apply import fast_apply, legacy_batched, tangent_sum
from manual_grad.functions._fuse import faster


@fast_apply
class Conv2dFunction(Function):
    r"""y = conv2d(x, W) + b: a linear layer applied at every position.

    Shapes: x (N, C, H, W), weight W (O, C/G, kh, kw) in G groups, y and g = dL/dy
    (N, O, Ho, Wo); stride s, padding p, dilation d. Read through the receptive-field
    columns cols = unfold(x) (N, C kh kw, Ho Wo), each group is the linear layer
        y[n, :, l] = W cols[n, :, l] + b            at every sample n and position l,
    so, exactly as for the linear layer:
        dL/dcols = W^T g,  dL/dx = fold(dL/dcols)   (fold adds overlapping windows back)
        dL/dW = sum over n and l of g[n, :, l] cols[n, :, l]^T     (batch AND positions)
        dL/db = sum over n and l of g[n, :, l]
    Building the columns costs kh kw copies of x, so ``backward`` computes the same sums
    the way convolution kernels can, without them:
        dL/dx = conv_transpose2d(g, W)   (the adjoint: each input pixel gets back
                                          W-weighted g from every window it was in)
        dL/dW[o, c, i, j] = sum over n, p, q of g[n, o, p, q] x[n, c, p s + i d, q s + j d]
              = a convolution of x with g as the kernel, sample axis n as the channels,
                stride d and dilation s (swapped), cut to kh x kw
    For complex tensors W and x enter conjugated, as in the linear layer.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, W, b, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
        ctx.save_for_forward(x, W)
        ctx.out_shape = output.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              W if ctx.needs_input_grad[0] else None)
        ctx.x_shape, ctx.w_shape = x.shape, W.shape

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, W = ctx.saved_tensors
        N, C, H, Wd = ctx.x_shape
        Out, Cg, kh, kw = ctx.w_shape
        G, s, p, d = ctx.groups, ctx.stride, ctx.padding, ctx.dilation
        Ho, Wo = g.shape[2:]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # rows/columns the forward's windows never reached (stride > 1) come back as
            # output_padding, so that dL/dx has x's shape
            extra = tuple(size - ((out - 1) * s_ - 2 * p_ + d_ * (k - 1) + 1) for size, out, s_,
                          p_, d_, k in ((H, Ho, s[0], p[0], d[0], kh),
                                        (Wd, Wo, s[1], p[1], d[1], kw)))
            args = (g, W.conj(), s, p, extra, G, d)
            form = _input_grad
            if N * C * H * Wd >= _MEASURED:  # measured: which layout is faster here
                form = faster(_input_layout_choices, (
                    g.device.type, g.dtype, torch.get_num_threads(), g.shape, g.stride(),
                    W.shape, W.stride(), s, p, extra, G, d),
                    (_input_grad, _input_grad_channels_last), args)
            grad_x = form(*args)
        if ctx.needs_input_grad[1] and N == 0:  # an empty batch adds nothing
            grad_W = x.new_zeros(ctx.w_shape)
        elif ctx.needs_input_grad[1] and legacy_batched(g):
            # torch's older vmap (autograd.grad(..., is_grads_batched=True)) cannot run a
            # convolution whose kernel is batched: the columns' sum above, as products
            cols = F.unfold(x.conj(), (kh, kw), d, p, s)  # (N, Cg G kh kw, L)
            L = cols.shape[-1]
            cols = cols.reshape(N, G, Cg * kh * kw, L).permute(1, 0, 3, 2).reshape(
                G, N * L, Cg * kh * kw)
            rows = g.reshape(N, G, Out // G, L).permute(1, 2, 0, 3).reshape(
                G, Out // G, N * L)
            grad_W = (rows @ cols).reshape(ctx.w_shape)  # per group: sum over n and l
        elif ctx.needs_input_grad[1]:
            args = (x, g, s, p, d, G, kh, kw)
            form = _weight_grad
            if max(x.numel(), g.numel()) >= _MEASURED:  # measured: the fastest form here
                forms = (_weight_grad, _weight_grad_channels_last)
                if G == 1:
                    forms += (_weight_grad_columns,)
                if (kh, kw, G, *p) == (1, 1, 1, 0, 0):
                    forms += (_weight_grad_1x1,)
                form = faster(_layout_choices, (x.device.type, x.dtype, torch.get_num_threads(),
                                                x.shape, x.stride(), g.shape, g.stride(), s, p,
                                                d, G, kh, kw), forms, args)
            grad_W = form(*args)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_W, grad_b, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW: Tensor | None, db: Tensor | None,
            *_: None) -> Tensor:
        """Forward mode, the product rule on the bilinear map (x, W) -> conv2d(x, W):
            dy = conv2d(dx, W) + conv2d(x, dW) + db"""
        x, W = ctx.saved_tensors
        args = (ctx.stride, ctx.padding, ctx.dilation, ctx.groups)
        return tangent_sum(None if dx is None else F.conv2d(dx, W, None, *args),
                           None if dW is None else F.conv2d(x, dW, None, *args),
                           None if db is None else db.view(1, -1, 1, 1), shape=ctx.out_shape)


def _input_grad(g: Tensor, W: Tensor, s: Any, p: Any, extra: Any, G: int, d: Any) -> Tensor:
    """dL/dx = conv_transpose2d(g, W): above."""
    return F.conv_transpose2d(g, W, None, s, p, extra, G, d)


def _input_grad_channels_last(g: Tensor, W: Tensor, s: Any, p: Any, extra: Any, G: int,
                              d: Any) -> Tensor:
    """The same transposed convolution on channels-last copies of g and W, its result
    returned in g's layout: on a 2-core x86 CPU (oneDNN) 2.7x faster for a strided 1 x 1
    (2.6 ms to 0.9 ms), copies included, and about as fast at 3 x 3: measured per shape
    (_fuse.faster)."""
    cl = torch.channels_last
    out = F.conv_transpose2d(g.contiguous(memory_format=cl), W.contiguous(memory_format=cl),
                             None, s, p, extra, G, d)
    return out if g.is_contiguous(memory_format=cl) else out.contiguous()


def _weight_grad(x: Tensor, g: Tensor, s: Any, p: Any, d: Any, G: int, kh: int, kw: int,
                 layout: torch.memory_format | None = None) -> Tensor:
    """dL/dW as the convolution of x with g as the kernel (above), per group: x's channels
    as the batch, the samples n as the channels; in ``layout`` if given."""
    N, C, H, Wd = x.shape
    Out, Ho, Wo = g.shape[1:]
    xt = x.conj().reshape(N, G, C // G, H, Wd).permute(2, 1, 0, 3, 4).reshape(
        C // G, G * N, H, Wd)
    gt = g.reshape(N, G, Out // G, Ho, Wo).permute(1, 2, 0, 3, 4).reshape(Out, N, Ho, Wo)
    if layout is not None:
        xt, gt = xt.contiguous(memory_format=layout), gt.contiguous(memory_format=layout)
    return F.conv2d(xt, gt, None, d, p, s, G).transpose(0, 1)[:, :, :kh, :kw]


def _weight_grad_channels_last(*args: Any) -> Tensor:
    """The same convolution on channels-last copies of its operands. The kernel here is as
    large as the image, a shape convolution libraries handle best channels-last: on a
    2-core x86 CPU (oneDNN) up to 30% faster at resnet sizes, copies included, and slower
    at some small ones, so it is measured per shape (_fuse.faster)."""
    return _weight_grad(*args, layout=torch.channels_last)


def _weight_grad_1x1(x: Tensor, g: Tensor, s: Any, p: Any, d: Any, G: int, kh: int,
                     kw: int) -> Tensor:
    """A 1 x 1 kernel without padding or groups: the columns are x itself, at every s-th
    position, and dL/dW = sum over n of g[n] cols[n]^T is the linear layer's line, one
    batched product (a strided 1 x 1 on a 2-core x86 CPU: 1.1 ms against 6.7 ms for the
    convolution; slower than it for some shapes, so measured per shape too)."""
    cols = x[:, :, ::s[0], ::s[1]].conj().flatten(2)  # (N, C, Ho Wo)
    return torch.bmm(g.flatten(2), cols.transpose(1, 2)).sum(0).view(g.shape[1], -1, 1, 1)


def _weight_grad_columns(x: Tensor, g: Tensor, s: Any, p: Any, d: Any, G: int, kh: int,
                         kw: int) -> Tensor:
    """The docstring's first line for dL/dW, on the columns themselves (one group): the
    columns of sample n are a strided view of the padded x, (C kh kw, Ho Wo), copied a
    block of samples at a time (about 4 MB of columns), and each block's g times its
    columns^T is summed into dL/dW. For few input channels and large images, where the
    convolution above has a huge kernel and a tiny output (a stem, 3 to 64 channels,
    7 x 7 stride 2 over 224 x 224 at batch 64 on a 2-core CPU: 125 ms against 325 ms),
    and slower at resnet's inner sizes, so measured per shape too."""
    N, C = x.shape[:2]
    Out, Ho, Wo = g.shape[1:]
    positions, K = Ho * Wo, C * kh * kw
    xp = F.pad(x, (p[1], p[1], p[0], p[0])).conj().resolve_conj()
    sn, sc, sh, sw = xp.stride()
    windows = xp.as_strided((C, kh, kw, N, Ho, Wo),
                            (sc, d[0] * sh, d[1] * sw, sn, s[0] * sh, s[1] * sw),
                            xp.storage_offset())
    block = max(1, _COLUMNS_BLOCK // (K * positions))
    grad_W = None
    for n in range(0, N, block):
        m = min(block, N - n)
        cols = windows[:, :, :, n:n + m].reshape(K, m * positions)
        rows = g[n:n + m].transpose(0, 1).reshape(Out, m * positions)
        grad_W = rows @ cols.T if grad_W is None else grad_W.addmm_(rows, cols.T)
    return grad_W.view(Out, C, kh, kw)


_COLUMNS_BLOCK = 1 << 20  # values of columns per block of samples (4 MB in float32)
# inputs from this many elements have their forms measured (below, the plain ones run)
_MEASURED = 1 << 17
# (device, dtype, threads, shapes, strides, options) -> the index of the form chosen
_layout_choices: dict[tuple, int] = {}
_input_layout_choices: dict[tuple, int] = {}
