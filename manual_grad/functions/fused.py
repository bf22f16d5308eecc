"""Fused blocks: several layers in one Function, one Python call forward and backward.

Each Python-level Function costs time on every call (here ~10-30 us per layer and step
on a 2-core CPU, forward and backward together), which shows at small batches. Fusing
the seed's linear -> ReLU -> linear into one Function pays that once; the math is the
same chain rule, written out in one backward.
"""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._fast_apply import fast_apply, tangent_sum
from manual_grad.functions.activations import relu_grad, relu_mask
from manual_grad.functions.linear import affine, as_rows


@fast_apply
class LinearReLUFunction(Function):
    r"""h = max(0, x W^T + b): Linear then ReLU in one call.

    With g = dL/dh and the ReLU mask read from h (h > 0 exactly where z > 0):
        dz = g * (h > 0)
        dL/dx = dz W      dL/dW = dz^T x      dL/db = sum of dz over the batch
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        return affine(x, W, b).clamp_min_(0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        needs_x, needs_W, _ = ctx.needs_input_grad
        x, W, _ = inputs
        ctx.save_for_backward(x if needs_W else None, W if needs_x else None, output)
        ctx.save_for_forward(x, W, output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, W, h = ctx.saved_tensors
        needs_x, needs_W, needs_b = ctx.needs_input_grad  # False for an absent bias
        dz = relu_grad(g, h)  # g * (h > 0)
        dz_rows = as_rows(dz)
        grad_x = dz @ W if needs_x else None
        grad_W = grad_b = None
        if needs_W:
            grad_W = dz_rows.t() @ as_rows(x)
        if needs_b:
            grad_b = dz_rows.sum(0)
        return grad_x, grad_W, grad_b

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW: Tensor | None, db: Tensor | None) -> Tensor:
        """Forward mode: dh = (dx W^T + x dW^T + db) * (h > 0), Linear's then ReLU's."""
        x, W, h = ctx.saved_tensors
        dz = tangent_sum(None if dx is None else affine(dx, W, None),
                         None if dW is None else affine(x, dW, None), db)
        return dz * relu_mask(h)  # (h's shape, whichever tangents came)


@fast_apply
class MLPFunction(Function):
    r"""y = max(0, x W1^T + b1) W2^T + b2: the seed's whole network in one call.

    Forward also returns the hidden activation h = max(0, x W1^T + b1), which backward
    reads. With g = dL/dy (and g_h = dL/dh, None unless something used h), backwards:
        dL/dW2 = g^T h          dL/db2 = sum g          dh = g W2 (+ g_h)
        dz = dh * (h > 0)                                (through the ReLU)
        dL/dW1 = dz^T x         dL/db1 = sum dz         dL/dx = dz W1
    h stays a differentiable output, so double backward reaches x and W1 through it.
    Each line is computed only when a gradient that needs it was asked for.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W1: Tensor, b1: Tensor | None, W2: Tensor,
                b2: Tensor | None) -> tuple[Tensor, Tensor]:
        h = affine(x, W1, b1).clamp_min_(0.0)
        return affine(h, W2, b2), h

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        _, h = output
        ctx.set_materialize_grads(False)  # no zero tensor for the (usually unused) g_h
        need = ctx.needs_input_grad
        x, W1 = inputs[0], inputs[1]
        ctx.save_for_backward(x if need[1] else None, W1 if need[0] else None, inputs[3], h)
        ctx.save_for_forward(x, W1, inputs[3], h)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, g_h: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W1, W2, h = ctx.saved_tensors
        need_x, need_W1, need_b1, need_W2, need_b2 = ctx.needs_input_grad  # False if absent
        h_rows = as_rows(h)
        grad_W2 = grad_b2 = grad_x = grad_W1 = grad_b1 = None
        g_rows = None
        if g is not None:
            g_rows = as_rows(g)
            grad_W2 = g_rows.t() @ h_rows if need_W2 else None
            grad_b2 = g_rows.sum(0) if need_b2 else None
        if (need_x or need_W1 or need_b1) and (g is not None or g_h is not None):
            dh = g_rows @ W2 if g_rows is not None else None
            if g_h is not None:
                g_h_rows = as_rows(g_h)
                dh = g_h_rows if dh is None else dh + g_h_rows
            dz = relu_grad(dh, h_rows)  # dh * (h > 0)
            if need_W1:
                grad_W1 = dz.t() @ as_rows(x)
            grad_b1 = dz.sum(0) if need_b1 else None
            grad_x = (dz @ W1).reshape(*h.shape[:-1], W1.shape[1]) if need_x else None
        return grad_x, grad_W1, grad_b1, grad_W2, grad_b2

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dW1: Tensor | None, db1: Tensor | None,
            dW2: Tensor | None, db2: Tensor | None) -> tuple[Tensor, Tensor]:
        """Forward mode, layer by layer:
            dh = (dx W1^T + x dW1^T + db1) * (h > 0)
            dy = dh W2^T + h dW2^T + db2
        and dh is also the tangent of the output h."""
        x, W1, W2, h = ctx.saved_tensors
        dz = tangent_sum(None if dx is None else affine(dx, W1, None),
                         None if dW1 is None else affine(x, dW1, None), db1)
        dh = None if dz is None else dz * relu_mask(h)
        dy = tangent_sum(None if dh is None else affine(dh, W2, None),
                         None if dW2 is None else affine(h, dW2, None), db2,
                         shape=(*h.shape[:-1], W2.shape[0]))
        return dy, (torch.zeros_like(h) if dh is None else dh)
