"""Attention with its backward pass derived by hand: softmax(q k^T s + bias) v."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply


@fast_apply
class MatmulFunction(Function):
    r"""y = a @ b for a (*, n, k) and b (*, k, m), batch dims broadcast.

    Each batch entry is a product of matrices, y_ij = sum_k a_ik b_kj, so
        dL/da = g b^T      dL/db = a^T g
    summed over any batch dim that broadcasting repeated (sum_to_size). Complex tensors
    enter conjugated, as in Linear.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        a, b = inputs
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None,
                              b if ctx.needs_input_grad[0] else None)
        ctx.shapes = a.shape, b.shape

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (g @ b.mT.conj()).sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            grad_b = (a.mT.conj() @ g).sum_to_size(ctx.shapes[1])
        return grad_a, grad_b


@fast_apply
class RepeatHeadsFunction(Function):
    r"""y = x with each of its H heads (dim -3) repeated r times in place (head h of y
    is head h // r of x): grouped-query attention's sharing of key and value heads.

    Head h of x reaches heads h r .. h r + r - 1 of y, so its gradient is their sum:
        dL/dx_h = sum over i < r of g_{h r + i}
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, r: int) -> Tensor:
        return x.repeat_interleave(r, dim=-3)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.heads, ctx.r = inputs[0].shape[-3], inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return g.unflatten(-3, (ctx.heads, ctx.r)).sum(-3), None


def safe_softmax(s: Tensor) -> Tensor:
    """softmax along the last dim, with 0 (not 0/0 = NaN) for a row every entry of which
    is masked out (-inf), as torch's attention does."""
    empty = (s == float("-inf")).all(-1, keepdim=True)
    # such a row is softmaxed as zeros instead (then dropped), so that no NaN arises
    # that a double backward would carry through the discarded branch
    p = torch.softmax(torch.where(empty, 0.0, s), -1)
    return torch.where(empty, 0.0, p)


def _rows(t: Tensor | None, r0: int, r1: int) -> Tensor | None:
    """Rows r0:r1 (dim -2) of a bias or mask, which may be broadcast along them."""
    if t is None or t.shape[-2] == 1:
        return t
    return t[..., r0:r1, :]


@fast_apply
class ScaledDotProductAttentionFunction(Function):
    r"""o = softmax(q k^T s + bias) v, one query row at a time; dropout optional.

    Shapes: q (*, L, E), k (*, S, E), v (*, S, Ev), o (*, L, Ev); bias broadcasts to
    (*, L, S) (attention masks come in as 0 / -inf, float masks as they are), s the
    scale. Per query row i, with scores z_j = q_i . k_j s + bias_ij, weights p = softmax(z)
    and (with dropout) p'_j = p_j m_j / (1 - d), m the kept positions:
        o_i = sum_j p'_j v_j
    so, with g_i = dL/do_i:
        dL/dv_j  = sum over rows i of p'_ij g_i                    (dv = p'^T g)
        dL/dp'_j = g_i . v_j,   dL/dp_j = dL/dp'_j m_j / (1 - d)
        dL/dz_j  = p_j (dL/dp_j - sum_l p_l dL/dp_l)                (softmax's rule)
        dL/dq_i  = s sum_j dL/dz_j k_j    dL/dk_j = s sum_i dL/dz_ij q_i
        dL/dbias = dL/dz
    The sum D_i = sum_l p_l dL/dp_l also equals g_i . o_i (FlashAttention's shortcut,
    which needs o kept); it is computed here from the block's weights, which backward
    has anyway: in float32 that rounds as torch's softmax backward does.

    The rows are independent, so they are computed in chunks of ``rows`` queries: only a
    (rows, S) block of scores exists at a time, forward and backward (which recomputes
    its block's weights from q and k), and memory grows linearly in L rather than as
    L x S. ``rows`` is chosen by the caller from the sizes (functional).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
                scale: float, keep_scale: float, rows: int) -> Tensor:
        kt = k.mT
        chunks = []
        for r0 in range(0, max(q.shape[-2], 1), rows):  # (one pass when L is 0)
            r1 = r0 + rows
            z = (q[..., r0:r1, :] @ kt) * scale
            if bias is not None:
                z = z + _rows(bias, r0, r1)
            p = safe_softmax(z)
            if keep is not None:
                p = p * _rows(keep, r0, r1) * keep_scale
            chunks.append(p @ v)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, -2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        q, k, v, bias, keep, ctx.scale, ctx.keep_scale, ctx.rows = inputs
        ctx.save_for_backward(q, k, v, bias, keep)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, keep = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        s, rows = ctx.scale, ctx.rows
        kt = k.mT
        dq, dk, dv, dbias = [], None, None, []
        for r0 in range(0, max(q.shape[-2], 1), rows):
            r1 = r0 + rows
            q_c, g_c = q[..., r0:r1, :], g[..., r0:r1, :]
            z = (q_c @ kt) * s
            if bias is not None:
                z = z + _rows(bias, r0, r1)
            p = safe_softmax(z)  # this block's weights, recomputed
            keep_c = None if keep is None else _rows(keep, r0, r1) * ctx.keep_scale
            if need_v:
                p_kept = p if keep_c is None else p * keep_c
                term = p_kept.mT @ g_c  # (S, Ev) from this block of rows
                dv = term if dv is None else dv + term
            dp = g_c @ v.mT  # dL/dp'
            if keep_c is not None:
                dp = dp * keep_c  # dL/dp
            dz = p * (dp - (p * dp).sum(-1, keepdim=True))  # p (dL/dp - D)
            if need_q:
                dq.append((dz @ k) * s)
            if need_k:
                term = (dz.mT @ q_c) * s
                dk = term if dk is None else dk + term
            if need_bias:
                dbias.append(dz)
        grad_q = (dq[0] if len(dq) == 1 else torch.cat(dq, -2)) if need_q else None
        grad_bias = None
        if need_bias:
            full = dbias[0] if len(dbias) == 1 else torch.cat(dbias, -2)
            grad_bias = full.sum_to_size(bias.shape)
        return (grad_q, dk.sum_to_size(k.shape) if need_k else None,
                dv.sum_to_size(v.shape) if need_v else None, grad_bias,
                None, None, None, None)
