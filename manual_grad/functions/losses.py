"""Loss functions with their backward passes derived by hand."""

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad import _compat
from manual_grad.functions._constants import constant
from manual_grad.functions._fast_apply import fast_apply, plain_backward, tangent_sum
from manual_grad.functions._fuse import fusable

REDUCTIONS = ("mean", "sum", "none")


@fast_apply
class MSELossFunction(Function):
    r"""Mean squared error, as ``torch.nn.functional.mse_loss``.

    With d = u - y (u the prediction, y the target, n = number of elements):

        'none':  C_i = d_i^2          dC/du = 2 d * g      g: same shape as C
        'sum':   C = sum_i d_i^2      dC/du = 2 d * g      g: a scalar
        'mean':  C = 1/n sum_i d_i^2  dC/du = 2 d * g / n  g: a scalar
        and always dC/dy = -dC/du (summed back to y's shape if y was broadcast).

    The difference d is recomputed in ``backward`` from the saved u and y rather
    than saved itself, so that the backward stays differentiable (double backward).
    """

    # torch.func.vmap batches forward and backward as written: both use only torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        # reduce((u - y)^2), by torch's own loss op: two kernels (the squared differences
        # into one temporary, then their reduction), where (u - y).square().mean() takes
        # three and two temporaries (the value is the same up to rounding; the backward
        # below is ours)
        return _compat.mse_loss_kernel(u, y, _compat.REDUCTION_ENUM[reduction])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        u, y, reduction = inputs
        ctx.save_for_backward(u, y)
        ctx.save_for_forward(u, y)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        needs_u, needs_y, _ = ctx.needs_input_grad
        if not (needs_u or needs_y):
            return None, None, None
        u, y = ctx.saved_tensors
        d = u - y  # broadcast shape; equals u's shape (functional.mse_loss checks)
        # max(.., 1): an empty batch has an empty gradient, not a division by zero.
        scale = 2.0 / max(d.numel(), 1) if ctx.reduction == "mean" else 2.0
        if not plain_backward(g):  # a graph of this backward is wanted, or g is batched
            grad_d = d * (g * scale)  # (scale * g first: a scalar product unless 'none')
        else:  # d is new here: scale it in place, by a kept tensor (see _constants)
            grad_d = d.mul_(g).mul_(constant(scale, g.dtype))
        grad_u = grad_y = None
        if needs_u:
            grad_u = grad_d if u.shape == d.shape else grad_d.sum_to_size(u.shape)
        if needs_y:
            grad_y = (-grad_d).sum_to_size(y.shape)
        return grad_u, grad_y, None

    @staticmethod
    def jvp(ctx: Any, du: Tensor | None, dy: Tensor | None, _: None) -> Tensor:
        """Forward mode: dC = reduce(2 d (du - dy))."""
        u, y = ctx.saved_tensors
        return _reduce(2 * (u - y) * _difference(du, dy), ctx.reduction)


def _difference(du: Tensor | None, dy: Tensor | None) -> Tensor:
    """The tangent of d = u - y (at least one of the two is given)."""
    if dy is None:
        return du
    return -dy if du is None else du - dy


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _scale(g: Tensor, reduction: str, n: int) -> Tensor:
    """dC/dloss_i for C = reduce(loss): g / n for 'mean', g for 'sum' and 'none'."""
    return g / max(n, 1) if reduction == "mean" else g


@fast_apply
class L1LossFunction(Function):
    r"""C = reduce(|u - y|).

        dC/du = sign(u - y) * g (/ n for 'mean')     0 where u == y, as torch
                (complex: (u - y) / |u - y| for the sign, torch's gradient of |.|)
        dC/dy = -dC/du
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return _reduce((u - y).abs(), reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        u, y, ctx.reduction = inputs
        ctx.save_for_backward(u, y)
        ctx.save_for_forward(u, y)

    @staticmethod
    def jvp(ctx: Any, du: Tensor | None, dy: Tensor | None, _: None) -> Tensor:
        """Forward mode: dC = reduce(sign(d) (du - dy)); for complex d, d|d| is the real
        part of conj(d / |d|) dd."""
        u, y = ctx.saved_tensors
        d, dd = u - y, _difference(du, dy)
        slope = (torch.sgn(d).conj() * dd).real if d.is_complex() else torch.sign(d) * dd
        return _reduce(slope, ctx.reduction)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None
        u, y = ctx.saved_tensors
        d = u - y
        # sgn: sign for real d; d / |d| for complex d, the gradient of |d| torch uses
        grad_d = torch.sgn(d) * _scale(g, ctx.reduction, d.numel())
        grad_u = grad_d.sum_to_size(u.shape) if ctx.needs_input_grad[0] else None
        grad_y = (-grad_d).sum_to_size(y.shape) if ctx.needs_input_grad[1] else None
        return grad_u, grad_y, None


@fast_apply
class HuberLossFunction(Function):
    r"""C = reduce(h(u - y)), h(d) = d^2 / 2 if |d| <= delta else delta (|d| - delta / 2).

        dh/dd = d if |d| <= delta else delta sign(d)   (the clamp of d to [-delta, delta])
        dC/du = clamp(d, -delta, delta) * g (/ n for 'mean');  dC/dy = -dC/du
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, y: Tensor, reduction: str = "mean", delta: float = 1.0) -> Tensor:
        d = (u - y).abs()
        return _reduce(torch.where(d <= delta, 0.5 * d * d, delta * (d - 0.5 * delta)),
                       reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        u, y, ctx.reduction, ctx.delta = inputs
        ctx.save_for_backward(u, y)
        ctx.save_for_forward(u, y)

    @staticmethod
    def jvp(ctx: Any, du: Tensor | None, dy: Tensor | None, *_: None) -> Tensor:
        """Forward mode: dC = reduce(clamp(d, -delta, delta) (du - dy))."""
        u, y = ctx.saved_tensors
        return _reduce((u - y).clamp(-ctx.delta, ctx.delta) * _difference(du, dy),
                       ctx.reduction)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        u, y = ctx.saved_tensors
        d = u - y
        grad_d = d.clamp(-ctx.delta, ctx.delta) * _scale(g, ctx.reduction, d.numel())
        grad_u = grad_d.sum_to_size(u.shape) if ctx.needs_input_grad[0] else None
        grad_y = (-grad_d).sum_to_size(y.shape) if ctx.needs_input_grad[1] else None
        return grad_u, grad_y, None, None


@fast_apply
class BCEWithLogitsLossFunction(Function):
    r"""Binary cross-entropy on logits z with targets y, weight w, positive weight p:

        l = -w [p y log s(z) + (1 - y) log(1 - s(z))],   s the sigmoid
          = w [p y softplus(-z) + (1 - y) softplus(z)]   (the stable form computed)
        dl/dz = w [(1 - y + p y) s(z) - p y]
        dl/dy = w [p softplus(-z) - softplus(z)]
    and C = reduce(l), so each gradient is scaled by g (/ n for 'mean').
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, y: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
                reduction: str = "mean") -> Tensor:
        py = y if pos_weight is None else pos_weight * y
        loss = py * torch.nn.functional.softplus(-z) + (1 - y) * torch.nn.functional.softplus(z)
        if weight is not None:
            loss = weight * loss
        return _reduce(loss, reduction)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, y, weight, pos_weight, ctx.reduction = inputs
        ctx.save_for_backward(z, y, weight, pos_weight)
        ctx.save_for_forward(z, y, weight, pos_weight)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor | None, dy: Tensor | None, dw: Tensor | None,
            dp: Tensor | None, _: None) -> Tensor:
        """Forward mode, each input's term of the loss's tangent:
            dl = w [(1 - y + p y) s(z) - p y] dz + w [p sp(-z) - sp(z)] dy
               + [p y sp(-z) + (1 - y) sp(z)] dw + w y sp(-z) dp"""
        z, y, weight, pos_weight = ctx.saved_tensors
        sp = torch.nn.functional.softplus
        p = 1.0 if pos_weight is None else pos_weight
        w = 1.0 if weight is None else weight
        dl = tangent_sum(
            None if dz is None else w * ((1 - y + p * y) * torch.sigmoid(z) - p * y) * dz,
            None if dy is None else w * (p * sp(-z) - sp(z)) * dy,
            None if dw is None else (p * y * sp(-z) + (1 - y) * sp(z)) * dw,
            None if dp is None else w * y * sp(-z) * dp)
        return _reduce(dl, ctx.reduction)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, y, weight, pos_weight = ctx.saved_tensors
        py = y if pos_weight is None else pos_weight * y
        # z and y share one shape (functional checks it): n is z's element count
        scale = _scale(g, ctx.reduction, z.numel())
        if weight is not None:
            scale = weight * scale
        grad_z = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_z = ((1 - y + py) * torch.sigmoid(z) - py) * scale
            grad_z = grad_z.sum_to_size(z.shape)
        if ctx.needs_input_grad[1]:
            p = 1.0 if pos_weight is None else pos_weight
            sp = torch.nn.functional.softplus
            grad_y = ((p * sp(-z) - sp(z)) * scale).sum_to_size(y.shape)
        return grad_z, grad_y, None, None, None


@fast_apply
class CrossEntropyLossFunction(Function):
    r"""Cross-entropy on logits z (N, C, *) or (C,), fused with its log-softmax.

    With q = log_softmax(z) along the class dim, every variant is one weighted sum
        loss_i = -sum_c a_ic q_ic,    C = sum_i loss_i / denominator (for 'mean')
    where the coefficients a come from the target:
        class indices t:  a_ic = w_t_i (1 - e) [c == t_i] + e w_c / C   (0 for ignored i),
                          denominator = sum over kept i of w_t_i (torch's nll convention)
        probabilities t:  a_ic = w_c ((1 - e) t_ic + e / C),  denominator = N (* spatial)
    (w the class weights, 1 if absent; e the label smoothing). Since dq_ic/dz_ik =
    [c == k] - softmax(z)_ik, one line gives the gradient of every variant:
        dloss_i/dz_i = softmax(z_i) * sum_c a_ic - a_i
    and, for probability targets, dloss_i/dt_ic = -w_c (1 - e) q_ic.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int,
                reduction: str, label_smoothing: float) -> Tensor:
        dim = 1 if z.dim() > 1 else 0
        q = torch.log_softmax(z, dim)
        if _plain_indices(t, weight, label_smoothing):
            # a is one-hot at t (0 for ignored samples): the sum over classes is one
            # entry, gathered, where the general form builds a and multiplies it in whole
            keep = t != ignore_index
            picked = q.gather(dim, torch.where(keep, t, 0).unsqueeze(dim)).squeeze(dim)
            loss, denominator = -(picked * keep), keep.sum()
        else:
            a, denominator = _cross_entropy_coefficients(z, t, weight, ignore_index,
                                                         label_smoothing)
            loss = -(a * q).sum(dim)
        if reduction == "mean":
            return loss.sum() / denominator
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, t, weight, ctx.ignore_index, ctx.reduction, ctx.label_smoothing = inputs
        ctx.save_for_backward(z, t, weight)
        ctx.save_for_forward(z, t, weight)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor | None, dt: Tensor | None, dw: Tensor | None,
            *_: None) -> Tensor:
        """Forward mode. loss_i = -sum_c a_ic q_ic, q = log_softmax(z), and the
        coefficients a are linear in the target probabilities t and in the weights w:
            dq = dz - sum_c softmax_c dz_c          (log_softmax's tangent)
            dloss_i = -sum_c (a_ic dq_ic + da_ic q_ic),  da = a(dt) or a(dw)
        and for 'mean' C = S / den: dC = (dS - C dden) / den, den = sum of kept w_t."""
        z, t, weight = ctx.saved_tensors
        dim = 1 if z.dim() > 1 else 0
        e = ctx.label_smoothing
        q = torch.log_softmax(z, dim)
        a, den = _cross_entropy_coefficients(z, t, weight, ctx.ignore_index, e)
        terms = []
        if dz is not None:
            terms.append(a * (dz - (torch.exp(q) * dz).sum(dim, keepdim=True)))
        if dt is not None:  # probability targets: a = ((1 - e) t + e / C) w
            w = 1.0 if weight is None else _class_view(weight, z)
            terms.append((1 - e) * dt * w * q)
        d_den = None
        if dw is not None:
            a_w, d_den = _cross_entropy_coefficients(z, t, dw, ctx.ignore_index, e)
            terms.append(a_w * q)
            if t.is_floating_point():
                d_den = None  # (the denominator is the count of samples then)
        dloss = -tangent_sum(*terms).sum(dim)
        if ctx.reduction == "none":
            return dloss
        if ctx.reduction == "sum":
            return dloss.sum()
        dC = dloss.sum() / den
        if d_den is not None:
            dC = dC - (-(a * q).sum() / den) * d_den / den
        return dC

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, t, weight = ctx.saved_tensors
        dim = 1 if z.dim() > 1 else 0
        if _plain_indices(t, weight, ctx.label_smoothing) and ctx.needs_input_grad[0]:
            # (compiled where that pays; else the scatter form, out of place where a
            # graph of it is wanted)
            grad_z = _index_grad(z, t, g, ctx.ignore_index, ctx.reduction)
            return grad_z, None, None, None, None, None
        a, denominator = _cross_entropy_coefficients(z, t, weight, ctx.ignore_index,
                                                     ctx.label_smoothing)
        if ctx.reduction == "none":
            g_i = g.unsqueeze(dim)  # one g per sample, broadcast over its classes
        else:
            g_i = g / denominator if ctx.reduction == "mean" else g
        grad_z = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_z = (torch.softmax(z, dim) * a.sum(dim, keepdim=True) - a) * g_i
            if not t.is_floating_point():
                # an ignored sample gets exactly 0, as in torch, also when every sample
                # is ignored and 'mean' divides by a zero denominator (0 * inf is NaN)
                kept = t != ctx.ignore_index
                grad_z = torch.where(kept.unsqueeze(dim) if z.dim() > 1 else kept, grad_z, 0)
        if ctx.needs_input_grad[1]:  # only probability targets are differentiable
            w = 1.0 if weight is None else _class_view(weight, z)
            q = torch.log_softmax(z, dim)
            grad_t = -w * (1 - ctx.label_smoothing) * q * g_i
        return grad_z, grad_t, None, None, None, None


def _index_grad_scatter(z: Tensor, t: Tensor, g: Tensor, ignore_index: int,
                        reduction: str) -> Tensor:
    """_index_grad's line, with the one-hot written by one scatter of -1 at each kept
    sample's class, in place on the fresh softmax where no graph of it is wanted."""
    dim = 1 if z.dim() > 1 else 0
    kept = t != ignore_index
    keep, at = kept.unsqueeze(dim).to(z.dtype), torch.where(kept, t, 0).unsqueeze(dim)
    if plain_backward(g):
        grad_z = torch.softmax(z, dim).mul_(keep).scatter_add_(dim, at, -keep)
    else:
        grad_z = (torch.softmax(z, dim) * keep).scatter_add(dim, at, -keep)
    return grad_z * _index_grad_scale(g, kept, reduction, dim)


def _index_grad_scale(g: Tensor, kept: Tensor, reduction: str, dim: int) -> Tensor:
    """What each sample's row is multiplied by: g per sample ('none'), g, or g over the
    count of kept samples ('mean'; every sample ignored: every row is 0, and stays 0, as
    in torch, with the count taken as 1 rather than dividing 0 by 0)."""
    if reduction == "none":
        return g.unsqueeze(dim)
    return g / kept.sum().clamp_min(1) if reduction == "mean" else g


@fusable(eager=_index_grad_scatter)
def _index_grad(z: Tensor, t: Tensor, g: Tensor, ignore_index: int, reduction: str
                ) -> Tensor:
    """dloss/dz for class indices, no weights, no smoothing (the docstring's line with a
    one-hot at t): (softmax(z) - onehot(t)) scaled per sample, 0 for ignored samples;
    compiled into one kernel where that pays (_fuse.py), the one-hot a comparison."""
    dim = 1 if z.dim() > 1 else 0
    kept = t != ignore_index
    classes = torch.arange(z.shape[dim], device=z.device).view(
        (-1,) + (1,) * (z.dim() - 1 - dim))
    onehot = (classes == t.unsqueeze(dim)).to(z.dtype)
    return (torch.softmax(z, dim) - onehot) * (kept.unsqueeze(dim).to(z.dtype)
                                               * _index_grad_scale(g, kept, reduction, dim))


def _plain_indices(t: Tensor, weight: Tensor | None, label_smoothing: float) -> bool:
    """Class-index targets, no class weights, no smoothing: the usual classifier's loss."""
    return weight is None and label_smoothing == 0 and not t.is_floating_point()


def _class_view(v: Tensor, z: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast along z's class dimension."""
    if z.dim() <= 1:
        return v
    return v.view(1, -1, *([1] * (z.dim() - 2)))


def _cross_entropy_coefficients(z: Tensor, t: Tensor, weight: Tensor | None,
                                ignore_index: int, e: float) -> tuple[Tensor, Tensor]:
    """The coefficients a (shaped like z) and the 'mean' denominator, see above."""
    dim = 1 if z.dim() > 1 else 0
    n_classes = z.shape[dim]
    w = None if weight is None else _class_view(weight, z)
    if t.is_floating_point():  # class probabilities, shaped like z
        a = (1 - e) * t + e / n_classes
        if w is not None:
            a = a * w
        return a, torch.tensor(z.numel() // n_classes, dtype=z.dtype, device=z.device)
    keep = t != ignore_index
    safe_t = torch.where(keep, t, 0)
    one_hot = torch.nn.functional.one_hot(safe_t, n_classes).to(z.dtype)
    one_hot = one_hot.movedim(-1, dim) if z.dim() > 1 else one_hot
    keep_c = keep.unsqueeze(dim).to(z.dtype) if z.dim() > 1 else keep.to(z.dtype)
    w_t = one_hot if w is None else one_hot * w  # w_t_i at the target class
    smooth = torch.ones_like(one_hot) if w is None else torch.ones_like(one_hot) * w
    a = ((1 - e) * w_t + e / n_classes * smooth) * keep_c
    return a, (w_t * keep_c).sum()
