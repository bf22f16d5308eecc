"""Normalisation layers with their backward passes derived by hand."""

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply, plain_backward, tangent_sum, traced
from manual_grad.functions._fuse import fusable


def centred_stats(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(var, mean, x - mean) over ``dims`` (kept as size 1), in two passes: the mean, then
    the mean squared deviation from it. torch.var_mean's one-pass kernel is 15-40x slower
    on this CPU build (over N, H, W of 64 x 16 x 28 x 28: 2.2 ms against 0.15 ms; over the
    last dim of 64 x 128 x 256: 6.4 ms against 0.2 ms), and the centred x is wanted next
    anyway."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    count = x.numel() // max(mean.numel(), 1)
    var = centred.square().sum(dims, keepdim=True) / max(count, 1)
    return var, mean, centred


def _scale_shift(xhat: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    """xhat w + b in one op when both are there. Out of place: under torch.func.vmap over
    the parameters alone (an ensemble of models on one input) w is batched and xhat not."""
    if w is not None and b is not None:
        if w.shape[-1] == 1 < xhat.shape[-1] and not traced():
            # per channel of (N, C, H, W): torch's CPU addcmul with a small first operand
            # broadcast over the inner dims is 3x slower than a product and an in-place
            # add (8 x 64 x 56 x 56: 0.66 ms against 0.19 ms); along the last dim
            # (LayerNorm) it is the faster
            return (xhat * w).add_(b)
        return torch.addcmul(b, xhat, w)
    if w is not None:
        return xhat * w
    return xhat + b if b is not None else xhat


def _xhat_tangent(dx: Tensor, xhat: Tensor, rstd: Tensor, dims: int | tuple[int, ...]
                  ) -> Tensor:
    """Forward mode of xhat = (x - mean) rstd over dims: the Jacobian is the backward's,
    and symmetric, so the same line pushes dx forward:
        dxhat = rstd (dx - mean(dx) - xhat mean(dx xhat))"""
    return rstd * (dx - dx.mean(dims, keepdim=True)
                   - xhat * (dx * xhat).mean(dims, keepdim=True))


def _rows_and_tangent(x: Tensor, m: int, eps: float, dx: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
    """(xhat, dxhat) in x's shape, x normalised in rows of m values (LayerNorm's rows, or
    GroupNorm's groups); dxhat None without dx."""
    centred, _, rstd = _row_stats(x.reshape(-1, m), eps)
    xhat = centred * rstd
    dxhat = None if dx is None else _xhat_tangent(dx.reshape(-1, m), xhat, rstd, 1)
    return xhat.view(x.shape), (None if dxhat is None else dxhat.view(x.shape))


def _row_stats(rows: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(centred, mean, rstd) of each row of a (rows, m) tensor: rows - mean, the mean and
    1 / sqrt(var + eps), the last two (rows, 1). The sum of squares is a norm, squared: a
    reduction that makes no squared copy."""
    mean = rows.mean(1, keepdim=True)
    centred = rows - mean
    var = torch.linalg.vector_norm(centred, dim=1).square() / rows.shape[1]
    return centred, mean, torch.rsqrt(var + eps).unsqueeze(1)


def _centred(rows: Tensor, mean: Tensor | None, rstd: Tensor | None,
             eps: float) -> tuple[Tensor, Tensor]:
    """(centred, rstd) of (rows, m) rows: from the forward's mean and rstd where given
    (constants: a plain backward), else recomputed from the rows (differentiably)."""
    if mean is None or rstd is None:
        centred, _, rstd = _row_stats(rows, eps)
        return centred, rstd
    return rows - mean, rstd


def _channel_centred(x: Tensor, mean: Tensor | None, var: Tensor | None
                     ) -> tuple[Tensor, Tensor]:
    """(var, x - mean) per channel (dim 1) of x (N, C, *), kept broadcastable: the given
    mean and var, else the batch's, recomputed from x (differentiably)."""
    if mean is None or var is None:
        var, _, centred = centred_stats(x, (0, *range(2, x.dim())))
        return var, centred
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return var.view(shape), x - mean.view(shape)


@fast_apply
class LayerNormFunction(Function):
    r"""y = (x - mean) / sqrt(var + eps) * w + b over the last k dims (normalized_shape).

    Shapes: x (*, *normalized_shape), w and b normalized_shape; flattened here to rows
    of the m values normalised together. Per row, with centred = x - mean,
    rstd = 1 / sqrt(var + eps), xhat = centred rstd, g = dL/dy and dxhat = g w:
        dL/dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))     means over a row
              = rstd dxhat - rstd mean(dxhat) - centred rstd^3 mean(g centred w)
        dL/dw = sum over rows of g xhat = sum over rows of rstd (g centred)
        dL/db = sum over rows of g
    Written this way, g centred serves both dL/dw and the last mean, and dL/dx is
    built in place: backward makes three full-size tensors (each a fresh allocation,
    slow on a CPU at this size) where the first form makes many.

    Returns (y, mean, rstd), the last two per row (rows, 1), as torch.native_layer_norm
    does: backward reuses them rather than reading x twice more for them (constants
    there: where a graph of the backward is wanted they are recomputed from x,
    differentiably).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: int, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        m = math.prod(x.shape[x.dim() - k:])
        w_row, b_row = (None if w is None else w.reshape(m)), (None if b is None else b.reshape(m))
        y, mean, rstd = _layer_norm_rows(x.reshape(-1, m), w_row, b_row, eps)
        return y.view(x.shape), mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, ctx.k, w, _, ctx.eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.save_for_forward(x, w)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, _: None, dw: Tensor | None, db: Tensor | None,
            __: None) -> tuple[Tensor | None, ...]:
        """Forward mode: dy = dxhat w + xhat dw + db, dxhat as in backward (per row)."""
        x, w = ctx.saved_tensors
        xhat, dxhat = _rows_and_tangent(x, math.prod(x.shape[x.dim() - ctx.k:]), ctx.eps, dx)
        dy = dxhat * w if dxhat is not None and w is not None else dxhat
        return tangent_sum(dy, None if dw is None else xhat * dw, db, shape=x.shape), None, None

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w, mean, rstd = ctx.saved_tensors
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        m = math.prod(x.shape[x.dim() - ctx.k:])
        rows = (x.reshape(-1, m), g.reshape(-1, m), w.reshape(m) if w is not None else None)
        if plain_backward(g) and need_x and (need_w or w is None):
            # the formula below as one function: compiled into fused kernels where that
            # pays (_fuse.py), else this same eager code; the forward's mean and rstd
            grad_x, grad_w, grad_b = _layer_norm_grads(*rows, mean, rstd, ctx.eps)
        else:  # (the statistics recomputed from x: a graph of them may be wanted)
            grad_x, grad_w, grad_b = _layer_norm_grads_eager(*rows, None, None, ctx.eps,
                                                             need_x, need_w)
        grad_x = grad_x.view(x.shape) if need_x else None
        grad_w = grad_w.view(w.shape) if need_w else None
        grad_b = grad_b.view(w.shape if w is not None else x.shape[x.dim() - ctx.k:]) \
            if need_b else None
        return grad_x, None, grad_w, grad_b, None


def _layer_norm_rows_eager(rows: Tensor, w: Tensor | None, b: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    centred, mean, rstd = _row_stats(rows, eps)
    xhat = centred.mul_(rstd)  # (no autograd here: centred is ours)
    return _scale_shift(xhat, w, b), mean, rstd


@fusable(eager=_layer_norm_rows_eager)
def _layer_norm_rows(rows: Tensor, w: Tensor | None, b: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of (n, m) rows: (xhat w + b, mean, rstd), xhat = (x - mean) rstd and
    rstd = 1 / sqrt(var + eps)."""
    mean = rows.mean(1, keepdim=True)
    centred = rows - mean
    rstd = torch.rsqrt(centred.square().mean(1, keepdim=True) + eps)
    return _scale_shift(centred * rstd, w, b), mean, rstd


def _layer_norm_grads_eager(x: Tensor, g: Tensor, w: Tensor | None, mean: Tensor | None,
                            rstd: Tensor | None, eps: float, need_x: bool = True,
                            need_w: bool = True
                            ) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """LayerNormFunction's three lines for (n, m) rows, in its second form (docstring),
    with the forward's mean and rstd or (None) recomputing them."""
    m = x.shape[1]
    centred, rstd = _centred(x, mean, rstd, eps)
    gc = g * centred if need_x or need_w else None
    grad_x = grad_w = None
    if need_x:
        gcw = gc @ w if w is not None else gc.sum(1)  # sum of g centred w
        dxhat = g * w if w is not None else g.clone()
        mean_dxhat = dxhat.mean(1, keepdim=True)
        # rstd dxhat - rstd mean(dxhat) - centred rstd^3 mean(g centred w), in place
        grad_x = dxhat.sub_(mean_dxhat).mul_(rstd).addcmul_(
            centred, rstd.pow(3) * (gcw.unsqueeze(1) / -m))
    if need_w and w is not None:
        grad_w = rstd.view(1, -1) @ gc
    return grad_x, grad_w, g.sum(0)


@fusable(eager=_layer_norm_grads_eager)
def _layer_norm_grads(x: Tensor, g: Tensor, w: Tensor | None, mean: Tensor, rstd: Tensor,
                      eps: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """LayerNormFunction's three lines for (n, m) rows, in their first form:
    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dw = sum g xhat, db = sum g."""
    xhat = (x - mean) * rstd
    dxhat = g * w if w is not None else g
    grad_x = rstd * (dxhat - dxhat.mean(1, keepdim=True)
                     - xhat * (dxhat * xhat).mean(1, keepdim=True))
    grad_w = (g * xhat).sum(0) if w is not None else None
    return grad_x, grad_w, g.sum(0)


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
    fresh allocation, slow on a CPU at this size).

    Returns (y, mean, var): in training also the batch's mean and (biased) variance per
    channel, which functional.batch_norm moves the running statistics towards and which
    backward reuses rather than reading x twice more for them (constants there: where a
    graph of the backward is wanted they are recomputed from x, differentiably). In eval
    the two are empty: the running statistics are the caller's.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor | None, b: Tensor | None, mean: Tensor | None,
                var: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if mean is None and x.numel():  # batch statistics
            return _batch_norm_train(x, w, b, eps)
        if mean is None:  # an empty batch: NaN statistics, as torch's
            var, batch_mean, centred = centred_stats(x, (0, *range(2, x.dim())))
            stats = (batch_mean.view(-1), var.view(-1))
        else:
            var, centred = var.view(shape), x - mean.view(shape)
            stats = (x.new_empty(0), x.new_empty(0))
        xhat = centred.mul_(torch.rsqrt(var + eps))  # (no autograd here: centred is ours)
        return _scale_shift(xhat, None if w is None else w.view(shape),
                            None if b is None else b.view(shape)), *stats

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, w, _, mean, var, ctx.eps = inputs
        _, batch_mean, batch_var = output
        ctx.mark_non_differentiable(batch_mean, batch_var)
        ctx.training = mean is None
        ctx.save_for_backward(x, w, *((batch_mean, batch_var) if ctx.training else (mean, var)))
        ctx.save_for_forward(x, w, mean, var)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dw: Tensor | None, db: Tensor | None,
            dmean: Tensor | None, dvar: Tensor | None, _: None) -> tuple[Tensor | None, ...]:
        """Forward mode: dy = dxhat w + xhat dw + db. In training dxhat is LayerNorm's
        line over the channel's values; in eval the statistics are inputs, and
            dxhat = rstd (dx - dmean) - centred rstd^3 dvar / 2"""
        x, w, mean, var = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = (0, *range(2, x.dim()))
        var_, centred = _channel_centred(x, mean, var)
        rstd = torch.rsqrt(var_ + ctx.eps)
        xhat = centred * rstd
        if mean is None:
            dxhat = None if dx is None else _xhat_tangent(dx, xhat, rstd, dims)
        else:
            dxhat = tangent_sum(None if dx is None else dx * rstd,
                                None if dmean is None else -dmean.view(shape) * rstd,
                                None if dvar is None else
                                -0.5 * centred * rstd.pow(3) * dvar.view(shape))
        if dxhat is not None and w is not None:
            dxhat = dxhat * w.view(shape)
        return tangent_sum(dxhat, None if dw is None else xhat * dw.view(shape),
                           None if db is None else db.view(shape).expand_as(x)), None, None

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.training:  # the batch's statistics
            if plain_backward(g) and need_x and (need_w or w is None) and x.numel():
                # the docstring's first form as one function, compiled into fused kernels
                # where that pays (_fuse.py), else the second form; the forward's mean
                # and var, constants here
                grad_x, grad_w, grad_b = _batch_norm_grads(x, g, w, mean, var, ctx.eps)
            else:  # (the statistics recomputed from x: a graph of them may be wanted)
                grad_x, grad_w, grad_b = _batch_norm_grads_eager(x, g, w, None, None, ctx.eps)
            return (grad_x if need_x else None, grad_w if need_w else None,
                    grad_b if need_b else None, None, None, None)
        # eval: the running statistics are constants
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = (0, *range(2, x.dim()))
        rstd = torch.rsqrt(var.view(shape) + ctx.eps)
        grad_x = g * (rstd * w.view(shape) if w is not None else rstd) if need_x else None
        grad_w = (rstd * (g * (x - mean.view(shape))).sum(dims, keepdim=True)).view(-1) \
            if need_w else None
        grad_b = g.sum(dims) if need_b else None  # False without bias
        return grad_x, grad_w, grad_b, None, None, None


def _batch_norm_train_eager(x: Tensor, w: Tensor | None, b: Tensor | None,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var, mean, centred = centred_stats(x, (0, *range(2, x.dim())))
    rstd = torch.rsqrt(var + eps)
    if traced():  # (out of place, as _scale_shift says)
        y = _scale_shift(centred * rstd, None if w is None else w.view(shape),
                         None if b is None else b.view(shape))
    else:  # centred s + b with s = w rstd, into centred: two passes
        s = rstd * w.view(shape) if w is not None else rstd
        y = centred.mul_(s) if b is None else centred.mul_(s).add_(b.view(shape))
    return y, mean.view(-1), var.view(-1)


@fusable(eager=_batch_norm_train_eager)
def _batch_norm_train(x: Tensor, w: Tensor | None, b: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with the batch's statistics per channel: (xhat w + b, mean, var)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dims, keepdim=True)
    xhat = centred * torch.rsqrt(var + eps)
    return (_scale_shift(xhat, None if w is None else w.view(shape),
                         None if b is None else b.view(shape)), mean.view(-1), var.view(-1))


def _batch_norm_grads_eager(x: Tensor, g: Tensor, w: Tensor | None, mean: Tensor | None,
                            var: Tensor | None, eps: float
                            ) -> tuple[Tensor, Tensor | None, Tensor]:
    """BatchNormFunction's training lines in their second form (two per-channel sums),
    with the forward's mean and var, or without them (None) recomputing them from x."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0, *range(2, x.dim()))
    var, centred = _channel_centred(x, mean, var)
    rstd = torch.rsqrt(var + eps)
    s = rstd * w.view(shape) if w is not None else rstd
    g_sum = g.sum(dims, keepdim=True)
    gc_sum = (g * centred).sum(dims, keepdim=True)
    m = x.numel() // g_sum.numel()
    # s g - s sum(g) / m - centred s rstd^2 sum(g centred) / m, into a fresh g s (an
    # addcmul whose first operand is per channel is 3x slower on a CPU: _scale_shift)
    grad_x = (g * s).sub_(s * g_sum / m)
    grad_x = grad_x.addcmul_(centred, s * rstd.square() * gc_sum / -m)
    return grad_x, (rstd * gc_sum).view(-1) if w is not None else None, g_sum.view(-1)


@fusable(eager=_batch_norm_grads_eager)
def _batch_norm_grads(x: Tensor, g: Tensor, w: Tensor | None, mean: Tensor, var: Tensor,
                      eps: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """BatchNormFunction's training lines in their first form, means per channel:
    dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), dw = sum g xhat, db = sum g."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0, *range(2, x.dim()))
    rstd = torch.rsqrt(var.view(shape) + eps)
    xhat = (x - mean.view(shape)) * rstd
    dxhat = g * w.view(shape) if w is not None else g
    grad_x = rstd * (dxhat - dxhat.mean(dims, keepdim=True)
                     - xhat * (dxhat * xhat).mean(dims, keepdim=True))
    grad_w = (g * xhat).sum(dims) if w is not None else None
    return grad_x, grad_w, g.sum(dims)


@fast_apply
class GroupNormFunction(Function):
    r"""y = (x - mean) / sqrt(var + eps) * w_c + b_c, statistics per sample and group.

    x (N, C, *) is cut into G groups of C/G channels; each (sample, group) is one row of
    m = C/G * prod(*) values normalised together, exactly as a LayerNorm row, but the
    scale w and shift b are per channel. Per row, with xhat = centred rstd and
    dxhat = g w (w broadcast over each channel's positions):
        dL/dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))     means over a row
        dL/dw_c = sum over samples and positions of g xhat;    dL/db_c = sum of g
    Returns (y, mean, rstd), the last two per row (N G, 1), as torch.native_group_norm
    does: backward reuses them (constants there: where a graph of the backward is
    wanted they are recomputed from x, differentiably).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, groups: int, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _group_norm(x, groups, w, b, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, ctx.groups, w, _, ctx.eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.save_for_forward(x, w)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, _: None, dw: Tensor | None, db: Tensor | None,
            __: None) -> tuple[Tensor | None, ...]:
        """Forward mode: dy = dxhat w + xhat dw + db, dxhat LayerNorm's line per group."""
        x, w = ctx.saved_tensors
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        xhat, dxhat = _rows_and_tangent(x, math.prod(x.shape[1:]) // ctx.groups, ctx.eps, dx)
        dy = dxhat * w.view(shape) if dxhat is not None and w is not None else dxhat
        return tangent_sum(dy, None if dw is None else xhat * dw.view(shape),
                           None if db is None else db.view(shape), shape=x.shape), None, None

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w, mean, rstd = ctx.saved_tensors
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        if plain_backward(g) and need_x and (need_w or w is None) and x.numel():
            # the docstring's lines from two sums per sample and channel, compiled into
            # fused kernels where that pays (_fuse.py); the forward's mean and rstd
            grad_x, grad_w, grad_b = _group_norm_grads(x, g, w, ctx.groups, mean, rstd,
                                                       ctx.eps)
        else:  # (the statistics recomputed from x: a graph of them may be wanted)
            grad_x, grad_w, grad_b = _group_norm_grads_eager(
                x, g, w, ctx.groups, None, None, ctx.eps, need_x, need_w, need_b)
        return grad_x, None, grad_w, grad_b if need_b else None, None


def _group_norm_eager(x: Tensor, groups: int, w: Tensor | None, b: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    N, C = x.shape[:2]
    m = math.prod(x.shape[1:]) // groups  # (not -1: an empty batch has no size to infer)
    centred, mean, rstd = _row_stats(x.reshape(N * groups, m), eps)
    if w is not None and N * C and not traced():
        # centred (rstd w) + b, into centred: the scale per sample and channel is
        # one pass where xhat and then xhat w are two, and a second tensor
        scale = (rstd.view(N, groups, 1) * w.view(1, groups, -1)).reshape(N, C, 1)
        y = centred.view(N, C, -1).mul_(scale)
        y = y if b is None else y.add_(b.view(1, C, 1))
        return y.view(x.shape), mean, rstd
    xhat = centred.mul_(rstd).view(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return _scale_shift(xhat, None if w is None else w.view(shape),
                        None if b is None else b.view(shape)), mean, rstd


@fusable(eager=_group_norm_eager)
def _group_norm(x: Tensor, groups: int, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm as y = x s + t, s and t per sample and channel: xhat w + b regrouped,
    with s = rstd w and t = b - mean rstd w, so that y is one pass over x once the
    statistics are known (compiled, 8 x 64 x 56 x 56 on a 2-core CPU: 0.30 ms where
    the lines as written took 1.2 ms)."""
    N, C = x.shape[:2]
    rows = x.reshape(N * groups, -1)
    mean = rows.mean(1, keepdim=True)
    rstd = torch.rsqrt((rows - mean).square().mean(1, keepdim=True) + eps)
    s = rstd.view(N, groups, 1).expand(N, groups, C // groups)
    s = s * w.view(1, groups, -1) if w is not None else s
    t = -mean.view(N, groups, 1) * s
    t = t + b.view(1, groups, -1) if b is not None else t
    y = x.reshape(N, C, -1) * s.reshape(N, C, 1) + t.reshape(N, C, 1)
    return y.view(x.shape), mean, rstd


def _group_norm_grads_eager(x: Tensor, g: Tensor, w: Tensor | None, groups: int,
                            mean: Tensor | None, rstd: Tensor | None, eps: float,
                            need_x: bool = True, need_w: bool = True,
                            need_b: bool = True) -> tuple[Tensor | None, ...]:
    """GroupNormFunction's three lines (its docstring), each only when needed, with the
    forward's mean and rstd or (None) recomputing them."""
    N, C = x.shape[:2]
    shape = (1, C) + (1,) * (x.dim() - 2)
    rows, m = N * groups, math.prod(x.shape[1:]) // groups
    centred, rstd = _centred(x.reshape(rows, m), mean, rstd, eps)
    xhat = (centred * rstd).view(x.shape)
    dims = (0, *range(2, x.dim()))
    grad_x = grad_w = grad_b = None
    if need_x:
        dxhat = (g * w.view(shape) if w is not None else g).reshape(rows, m)
        xhat_rows = xhat.reshape(rows, m)
        mean_dxhat = dxhat.mean(1, keepdim=True)
        mean_dxhat_xhat = (dxhat * xhat_rows).mean(1, keepdim=True)
        grad_x = (rstd * (dxhat - mean_dxhat - xhat_rows * mean_dxhat_xhat)).view(x.shape)
    if need_w and w is not None:
        grad_w = (g * xhat).sum(dims)
    if need_b:
        grad_b = g.sum(dims)
    return grad_x, grad_w, grad_b


def _group_norm_grads_sums(x: Tensor, g: Tensor, w: Tensor | None, groups: int,
                          mean: Tensor, rstd: Tensor, eps: float) -> tuple[Tensor | None, ...]:
    """GroupNormFunction's three lines from two sums per sample and channel, sum(g) and
    sum(g x), with the forward's mean and rstd (k runs over a group's channels, M over
    its positions, m = k M):
        mean(dxhat)       = sum_k w_k sum(g)_k / m
        mean(dxhat xhat)  = rstd sum_k w_k (sum(g x)_k - mean sum(g)_k) / m
    so dL/dx = a g + c x + d, with a = rstd w_k, c = -rstd^2 mean(dxhat xhat) and
    d = rstd^2 mean mean(dxhat xhat) - rstd mean(dxhat), each per sample and channel:
    one full-size tensor and four passes over memory, where the lines as written make
    six tensors and twelve passes (8 x 64 x 56 x 56 on a 2-core CPU: 3.2 ms to 1.0 ms)."""
    N, C = x.shape[:2]
    m = math.prod(x.shape[1:]) // groups
    xf, gf = x.reshape(N, C, -1), g.reshape(N, C, -1)
    sum_g = gf.sum(2).view(N, groups, -1)  # (N, G, C/G)
    sum_gx = torch.linalg.vecdot(gf, xf).view(N, groups, -1)
    mean, rstd = mean.view(N, groups, 1), rstd.view(N, groups, 1)
    wk = w.view(1, groups, -1) if w is not None else torch.ones_like(sum_g[:1])
    sum_gc = sum_gx - mean * sum_g  # sum of g centred, per sample and channel
    mean_dxhat = (wk * sum_g).sum(2, keepdim=True) / m
    mean_dxhat_xhat = rstd * (wk * sum_gc).sum(2, keepdim=True) / m
    a = (rstd * wk).reshape(N, C, 1)
    c = (-rstd.square() * mean_dxhat_xhat).expand_as(sum_g).reshape(N, C, 1)
    d = (rstd.square() * mean * mean_dxhat_xhat - rstd * mean_dxhat).expand_as(sum_g)
    grad_x = (gf * a).addcmul_(xf, c).add_(d.reshape(N, C, 1))
    grad_w = (rstd * sum_gc).sum(0).reshape(C) if w is not None else None
    return grad_x.view(x.shape), grad_w, sum_g.sum(0).reshape(C)


# Compiled from the sums form, not the lines as written: inductor made slow code of
# those per-row means at GroupNorm sizes (8 x 64 x 56 x 56 on a 2-core CPU: 10 ms
# static, 160 ms with symbolic sizes, against 0.35 ms for the sums form, static)
_group_norm_grads = fusable()(_group_norm_grads_sums)


@fast_apply
class RMSNormFunction(Function):
    r"""y = x r w over the last k dims (normalized_shape), r = 1 / sqrt(mean(x^2) + eps).

    Per row of the m values normalised together, with a = g w:
        dr/dx_j = -r^3 x_j / m,   so
        dL/dx = r a - r^3 x mean(a x)                                   means over a row
        dL/dw = sum over rows of g x r
    No mean is subtracted: RMSNorm is LayerNorm without centring (and without a bias).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: int, w: Tensor | None, eps: float) -> Tensor:
        m = math.prod(x.shape[x.dim() - k:])
        rows = x.reshape(-1, m)
        r = torch.rsqrt(rows.square().mean(1, keepdim=True) + eps)
        y = (rows * r).view(x.shape)
        return y * w if w is not None else y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, ctx.k, w, ctx.eps = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, _: None, dw: Tensor | None, __: None) -> Tensor:
        """Forward mode: dr = -r^3 mean(x dx), so
            dy = (r dx - r^3 x mean(x dx)) w + x r dw"""
        x, w = ctx.saved_tensors
        m = math.prod(x.shape[x.dim() - ctx.k:])
        rows = x.reshape(-1, m)
        r = torch.rsqrt(rows.square().mean(1, keepdim=True) + ctx.eps)
        dy = None
        if dx is not None:
            dx_rows = dx.reshape(-1, m)
            dy = (r * dx_rows - r.pow(3) * rows * (rows * dx_rows).mean(1, keepdim=True)
                  ).view(x.shape)
            dy = dy * w if w is not None else dy
        return tangent_sum(dy, None if dw is None else (rows * r).view(x.shape) * dw,
                           shape=x.shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, _, need_w, _ = ctx.needs_input_grad
        m = math.prod(x.shape[x.dim() - ctx.k:])
        rows, g_rows = x.reshape(-1, m), g.reshape(-1, m)
        r = torch.rsqrt(rows.square().mean(1, keepdim=True) + ctx.eps)
        # (complex x, as torch takes it: the Jacobian enters conjugated, conj(x r) and
        # conj(w); conj is a no-op view for real tensors)
        rows, r = rows.conj(), r.conj()
        grad_x = grad_w = None
        if need_x:
            a = g_rows * w.reshape(m).conj() if w is not None else g_rows
            grad_x = (r * a - r.pow(3) * rows * (a * rows).mean(1, keepdim=True)).view(x.shape)
        if need_w:
            grad_w = (g_rows * rows * r).sum(0).view(w.shape)
        return grad_x, None, grad_w, None
