"""Attention with its backward pass derived by hand: softmax(q k^T s + bias) v."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply, plain_backward, tangent_sum, traced


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
        ctx.save_for_forward(a, b)
        ctx.shapes = a.shape, b.shape, output.shape

    @staticmethod
    def jvp(ctx: Any, da: Tensor | None, db: Tensor | None) -> Tensor:
        """Forward mode, the product rule: dy = da b + a db."""
        a, b = ctx.saved_tensors
        return tangent_sum(None if da is None else da @ b, None if db is None else a @ db,
                           shape=ctx.shapes[2])

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
    def jvp(ctx: Any, dx: Tensor, _: None) -> Tensor:
        """Forward mode: the same repetition, dy = dx with each head repeated r times."""
        return dx.repeat_interleave(ctx.r, dim=-3)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return g.unflatten(-3, (ctx.heads, ctx.r)).sum(-3), None


def _rows(t: Tensor | None, r0: int, r1: int) -> Tensor | None:
    """Rows r0:r1 (dim -2) of t, which may be broadcast along them; t itself when that is
    all of it (no view: torch's older vmap, which batches tangents, refuses one)."""
    if t is None or t.shape[-2] == 1 or (r0 == 0 and r1 >= t.shape[-2]):
        return t
    return t[..., r0:r1, :]


def block_weights(q_c: Tensor, kt: Tensor, scale: float, bias: Tensor | None, causal: bool,
                  r0: int, in_place: bool) -> Tensor:
    """p = softmax(q_c k^T scale + bias) for the query rows r0.. of q_c, keys after each
    query masked out when causal. A row that may attend to nothing (every score -inf,
    possible only through bias) gets weights 0, as torch's attention gives; it is
    softmaxed as zeros first, so that no NaN arises for a double backward to carry.
    ``in_place``: the scores are added to and masked in place (not while a graph of this
    is recorded): one block of scores alive, not three."""
    z = (q_c * scale) @ kt  # (scaling the rows of q costs a (rows, E) copy, not (rows, S))
    if bias is not None:
        z = z.add_(bias) if in_place and z.shape == torch.broadcast_shapes(
            z.shape, bias.shape) else z + bias
    if causal:  # key j > query i: out (torch's tril(ones(L, S)), top-left aligned)
        i = torch.arange(r0, r0 + z.shape[-2], device=z.device).unsqueeze(1)
        later = torch.arange(z.shape[-1], device=z.device) > i
        z = z.masked_fill_(later, float("-inf")) if in_place else \
            z.masked_fill(later, float("-inf"))
    if bias is None:
        return torch.softmax(z, -1)
    empty = (bias == float("-inf")).all(-1, keepdim=True)
    if not traced() and not empty.any():
        return torch.softmax(z, -1)
    return torch.where(empty, 0.0, torch.softmax(torch.where(empty, 0.0, z), -1))


@fast_apply
class ScaledDotProductAttentionFunction(Function):
    r"""o = softmax(q k^T s + bias) v, one query row at a time; dropout optional.

    Shapes: q (*, L, E), k (*, S, E), v (*, S, Ev), o (*, L, Ev); bias broadcasts to
    (*, L, S) (attention masks come in as 0 / -inf, float masks as they are), s the
    scale; causal masks the keys after each query. Per query row i, with scores
    z_j = q_i . k_j s + bias_ij, weights p = softmax(z) and (with dropout)
    p'_j = p_j m_j / (1 - d), m the kept positions:
        o_i = sum_j p'_j v_j
    so, with g_i = dL/do_i:
        dL/dv_j  = sum over rows i of p'_ij g_i                    (dv = p'^T g)
        dL/dp'_j = g_i . v_j,   dL/dp_j = dL/dp'_j m_j / (1 - d)
        dL/dz_j  = p_j (dL/dp_j - D_i),  D_i = sum_l p_l dL/dp_l    (softmax's rule)
        dL/dq_i  = s sum_j dL/dz_j k_j    dL/dk_j = s sum_i dL/dz_ij q_i
        dL/dbias = dL/dz
    D_i also equals g_i . o_i (FlashAttention's shortcut, which needs o kept); it is
    computed here from the block's weights, which backward has anyway: in float32 that
    rounds as torch's softmax backward does.

    The rows are independent, so they are computed in chunks of ``rows`` queries, chosen
    by the caller from the sizes (functional.attention_rows): only a (rows, S) block of
    scores exists at a time, forward and backward, so memory grows linearly in L rather
    than as L x S. Backward recomputes each chunk's weights from q and k, as torch's
    flash-attention kernels do: nothing of L x S is kept between forward and backward,
    at the cost of one more q k^T product per chunk (keeping them, as torch's math path
    does, made a 4-layer GPT at T = 64 keep 11% more than torch.nn for ~3% less time).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
                scale: float, keep_scale: float, causal: bool,
                rows: int) -> Tensor:
        kt, L = k.mT, q.shape[-2]
        chunks = []
        for r0 in range(0, max(L, 1), rows):  # (one pass when L is 0)
            r1 = r0 + rows
            p = block_weights(q[..., r0:r1, :], kt, scale, _rows(bias, r0, r1), causal, r0,
                              in_place=True)
            chunks.append((p if keep is None else p * _rows(keep, r0, r1) * keep_scale) @ v)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, -2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        q, k, v, bias, keep, ctx.scale, ctx.keep_scale, ctx.causal, ctx.rows = inputs
        ctx.save_for_backward(q, k, v, bias, keep)
        ctx.save_for_forward(q, k, v, bias, keep)
        ctx.out_shape = output.shape

    @staticmethod
    def jvp(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
            dbias: Tensor | None, *_: None) -> Tensor:
        """Forward mode, chunk by chunk as forward:
            dz = s (dq k^T + q dk^T) + dbias                 (the scores' tangent)
            dp = p (dz - sum_l p_l dz_l)                     (softmax's, per row)
            do = (dp m / (1 - d)) v + p' dv"""
        q, k, v, bias, keep = ctx.saved_tensors
        s, rows, kt = ctx.scale, ctx.rows, k.mT
        chunks = []
        for r0 in range(0, max(q.shape[-2], 1), rows):
            r1 = r0 + rows
            q_c = _rows(q, r0, r1)
            p = block_weights(q_c, kt, s, _rows(bias, r0, r1), ctx.causal, r0, False)
            keep_c = None if keep is None else _rows(keep, r0, r1) * ctx.keep_scale
            dz = tangent_sum(None if dq is None else (_rows(dq, r0, r1) * s) @ kt,
                             None if dk is None else (q_c * s) @ dk.mT,
                             _rows(dbias, r0, r1))
            do = None
            if dz is not None:
                dp = p * (dz - (p * dz).sum(-1, keepdim=True))
                do = (dp if keep_c is None else dp * keep_c) @ v
            if dv is not None:
                do = tangent_sum(do, (p if keep_c is None else p * keep_c) @ dv)
            chunks.append(do)
        do = chunks[0] if len(chunks) == 1 else torch.cat(chunks, -2)
        return tangent_sum(do, shape=ctx.out_shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, keep = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        s, rows = ctx.scale, ctx.rows
        plain = plain_backward(g)  # (else differentiated again: out of place)
        kt = k.mT
        dq, dk, dv, dbias = [], None, None, []
        for r0 in range(0, max(q.shape[-2], 1), rows):
            r1 = r0 + rows
            q_c, g_c = q[..., r0:r1, :], g[..., r0:r1, :]
            keep_c = None if keep is None else _rows(keep, r0, r1) * ctx.keep_scale
            # this block's weights, recomputed
            p = block_weights(q_c, kt, s, _rows(bias, r0, r1), ctx.causal, r0, plain)
            if need_v:
                p_kept = p if keep_c is None else p * keep_c
                term = p_kept.mT @ g_c  # (S, Ev) from this block of rows
                dv = term if dv is None else dv + term
            dp = g_c @ v.mT  # dL/dp'
            if keep_c is not None:
                dp = dp * keep_c  # dL/dp
            if plain:  # p (dL/dp - D), in place in dp's block
                dz = dp.mul_(p)
                dz.addcmul_(p, dz.sum(-1, keepdim=True), value=-1.0)
            else:
                p_dp = p * dp
                dz = p_dp - p * p_dp.sum(-1, keepdim=True)  # p (dL/dp - D)
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
                None, None, None, None, None)
