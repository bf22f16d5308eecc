"""Pooling layers with their backward passes derived by hand."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.nn import functional as F

from manual_grad.functions._fast_apply import fast_apply, plain_backward


@fast_apply
class MaxPool2dFunction(Function):
    r"""y[n, c, l] = max over window l of x[n, c, .]; the winner's flat index is kept.

    Only the winner of each window moves the output, with slope 1, so the gradient is
    routed back to it (added up when windows overlap and share a winner):
        dL/dx[n, c, i] = sum over windows l won by i of g[n, c, l]     (a scatter-add)
    Saved: the int64 indices, not x.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int],
                ceil_mode: bool) -> tuple[Tensor, Tensor]:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)
        ctx.x_shape = inputs[0].shape

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            *lead, H, W = ctx.x_shape
            flat = g.new_zeros(*lead, H * W)
            # (reshape, not flatten: torch's older vmap, behind is_grads_batched, has no
            # rule for flatten)
            n_out = g.shape[-2] * g.shape[-1]  # (not -1: an empty batch has no size to infer)
            rows, where = g.reshape(*lead, n_out), indices.reshape(*lead, n_out)
            if plain_backward(g):  # into the fresh zeros: no second x-sized tensor
                grad_x = flat.scatter_add_(-1, where, rows).view(ctx.x_shape)
            else:
                grad_x = flat.scatter_add(-1, where, rows).view(ctx.x_shape)
        return grad_x, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, *_: None) -> tuple[Tensor, None]:
        """Forward mode: each window's output moves with its winner, dy = dx[winner]
        (a gather by the same indices backward scatters by)."""
        (indices,) = ctx.saved_tensors
        *lead, H, W = dx.shape
        n_out = indices.shape[-2] * indices.shape[-1]
        dy = dx.reshape(*lead, H * W).gather(-1, indices.reshape(*lead, n_out))
        return dy.view(indices.shape), None


@fast_apply
class AvgPool2dFunction(Function):
    r"""y[n, c, l] = sum over window l of x[n, c, .] / d_l.

    d_l is the window's size within the padded input (kh kw, except for the last
    windows of ceil_mode, which may reach past the padding), or the count of real
    (non-padding) elements in window l when count_include_pad is False, or
    divisor_override, as torch's kernel divides. The map is linear, so each element of
    window l receives g / d_l, and overlapping windows add up:
        dL/dcols[n, c, :, l] = g[n, c, l] / d_l,    dL/dx = fold(dL/dcols)
    With ceil_mode the fold runs on an input grown at the bottom and right to hold the
    last windows whole, and the rows and columns past the input are dropped.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], ceil_mode: bool, count_include_pad: bool,
                divisor_override: int | None) -> Tensor:
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        (x, ctx.kernel_size, ctx.stride, ctx.padding, ctx.ceil_mode, ctx.count_include_pad,
         ctx.divisor) = inputs
        ctx.x_shape = x.shape

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, *_: None) -> Tensor:
        """Forward mode: pooling is linear, dy = avg_pool2d(dx), the same windows and
        divisors."""
        return F.avg_pool2d(dx, ctx.kernel_size, ctx.stride, ctx.padding, ctx.ceil_mode,
                            ctx.count_include_pad, ctx.divisor)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        *lead, H, W = ctx.x_shape
        (kh, kw), (sh, sw), (ph, pw) = ctx.kernel_size, ctx.stride, ctx.padding
        Ho, Wo = g.shape[-2:]
        L = Ho * Wo
        # rows/columns the last windows reach past the padded input (ceil_mode only)
        eh = max(0, (Ho - 1) * sh + kh - (H + 2 * ph))
        ew = max(0, (Wo - 1) * sw + kw - (W + 2 * pw))
        if ctx.divisor is not None:
            divisor = float(ctx.divisor)
        elif ctx.count_include_pad and not (eh or ew):
            divisor = float(kh * kw)
        else:  # count per window: unfold a map of what counts, on the padded grid
            counted = g.new_zeros(1, 1, H + 2 * ph + eh, W + 2 * pw + ew)
            if ctx.count_include_pad:  # the input and its padding; not past the padding
                counted[..., : H + 2 * ph, : W + 2 * pw] = 1.0
            else:  # the input's own elements only
                counted[..., ph : ph + H, pw : pw + W] = 1.0
            divisor = F.unfold(counted, (kh, kw), stride=(sh, sw)).sum(1).view(1, 1, L)
        if (sh, sw) == (kh, kw) and not (ph or pw or eh or ew) and isinstance(divisor, float):
            # windows that tile the input without overlap: each element's one window's
            # g / d, written straight into place (fold's scatter-add has nothing to add;
            # on a 2-core CPU it took 2.5x as long with two threads); rows and columns
            # no window reached (floor mode) get 0
            tiles = (g.reshape(-1, Ho, 1, Wo, 1) / divisor).expand(-1, Ho, kh, Wo, kw)
            grad_x = tiles.reshape(-1, Ho * kh, Wo * kw)
            if (Ho * kh, Wo * kw) != (H, W):
                grad_x = F.pad(grad_x, (0, W - Wo * kw, 0, H - Ho * kh))
            return grad_x.reshape(ctx.x_shape), None, None, None, None, None, None
        per_window = g.reshape(-1, 1, L) / divisor  # (N C, 1, L)
        d_cols = per_window.expand(-1, kh * kw, L)
        grad_x = F.fold(d_cols, (H + eh, W + ew), (kh, kw), padding=(ph, pw), stride=(sh, sw))
        if eh or ew:
            grad_x = grad_x[..., :H, :W]
        return grad_x.reshape(ctx.x_shape), None, None, None, None, None, None


def adaptive_windows(size: int, out: int, like: Tensor) -> Tensor:
    """The (out, size) averaging matrix of adaptive pooling along one axis: row i holds
    1 / n_i over window i = [floor(i size / out), ceil((i + 1) size / out)), n_i its
    length, as torch's kernel cuts the windows."""
    i = torch.arange(out, device=like.device)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    j = torch.arange(size, device=like.device)
    inside = (j >= start.unsqueeze(1)) & (j < end.unsqueeze(1))
    return inside.to(like.dtype) / (end - start).unsqueeze(1).to(like.dtype)


@fast_apply
class AdaptiveAvgPool2dFunction(Function):
    r"""y = the mean of each of oh x ow windows that tile x (N, C, H, W) as evenly as
    integers allow. Window (i, j) spans rows [floor(i H / oh), ceil((i+1) H / oh)) and the
    like for columns, so averaging is separable: with P_H (oh, H) holding 1/n_i over
    window i's rows, and P_W (ow, W) likewise,

        y = P_H x P_W^T                   (per sample and channel)
        dL/dx = P_H^T g P_W               (each pixel gets g / n from every window it is in)

    Global pooling (oh = ow = 1) is the case dL/dx = g / (H W) everywhere.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, output_size: tuple[int, int]) -> Tensor:
        return F.adaptive_avg_pool2d(x, output_size)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.x_shape, ctx.output_size = inputs[0].shape, inputs[1]

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, _: None) -> Tensor:
        """Forward mode: linear, dy = P_H dx P_W^T."""
        H, W = ctx.x_shape[-2:]
        oh, ow = ctx.output_size
        return adaptive_windows(H, oh, dx) @ dx @ adaptive_windows(W, ow, dx).t()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        H, W = ctx.x_shape[-2:]
        oh, ow = g.shape[-2:]
        P_H, P_W = adaptive_windows(H, oh, g), adaptive_windows(W, ow, g)
        return P_H.t() @ g @ P_W, None  # (H, oh) (.., oh, ow) (ow, W)
