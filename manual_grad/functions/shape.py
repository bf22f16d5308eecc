"""Flatten and Embedding: layers that move or look up values, with hand-derived backward."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply, plain_backward
from manual_grad.functions.linear import as_rows


@fast_apply
class FlattenFunction(Function):
    r"""y = x with dims start..end merged into one. Nothing is computed, only relabelled:
        dL/dx = g reshaped back to x's shape
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, start_dim: int, end_dim: int) -> Tensor:
        return x.flatten(start_dim, end_dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.x_shape, ctx.y_shape = inputs[0].shape, output.shape

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        return (g.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None), None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, *_: None) -> Tensor:
        """Forward mode: the same relabelling, dy = dx flattened (a view, as forward
        returns one)."""
        return dx.view(ctx.y_shape)


@fast_apply
class EmbeddingFunction(Function):
    r"""y[..., :] = W[i[...], :]: a row lookup, i (*) of int64, W (num, dim), y (*, dim).

    Row r of W reaches every output position that looked it up, so its gradient is the
    sum of theirs (a scatter-add over the flattened indices):
        dL/dW[r] = sum over positions p with i[p] == r of g[p]      (/ count(r) if
                   scale_grad_by_freq; 0 for padding_idx)
    The indices get no gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(i: Tensor, W: Tensor, padding_idx: int | None, scale_grad_by_freq: bool) -> Tensor:
        # the rows picked by index_select (W[i]'s values; its kernel is the faster one)
        return W.index_select(0, i.reshape(-1)).view(*i.shape, W.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        i, W, ctx.padding_idx, ctx.scale_grad_by_freq = inputs
        ctx.save_for_backward(i)
        ctx.save_for_forward(i)
        ctx.num_embeddings = W.shape[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor | None, None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        (i,) = ctx.saved_tensors
        flat_i, rows = i.reshape(-1), as_rows(g)
        if ctx.scale_grad_by_freq:
            # how often each row was looked up (bincount's answer, by an op that also
            # runs on meta tensors; integer sums, so exact and deterministic)
            counts = flat_i.new_zeros(ctx.num_embeddings).index_add(
                0, flat_i, torch.ones_like(flat_i))
            rows = rows / counts[flat_i].unsqueeze(1).to(rows.dtype)
        if ctx.padding_idx is not None:
            rows = rows * (flat_i != ctx.padding_idx).unsqueeze(1).to(rows.dtype)
        grad_W = rows.new_zeros(ctx.num_embeddings, rows.shape[1])
        if plain_backward(g):  # into the fresh zeros, not a copy of them (a whole W's size)
            return None, grad_W.index_add_(0, flat_i, rows), None, None
        return None, grad_W.index_add(0, flat_i, rows), None, None

    @staticmethod
    def jvp(ctx: Any, _: None, dW: Tensor, *__: None) -> Tensor:
        """Forward mode: the lookup is linear in W, dy = dW[i] (padding_idx and
        scale_grad_by_freq change only what backward hands W, not the derivative)."""
        (i,) = ctx.saved_tensors
        return dW[i]
