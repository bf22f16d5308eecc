"""Element-wise activations with their backward passes derived by hand."""

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from manual_grad.functions._constants import constant
from manual_grad.functions._fast_apply import fast_apply, plain_backward
from manual_grad.functions._fuse import fusable


def relu_mask(u: Tensor) -> Tensor:
    """du/dz for u = max(0, z), read from u >= 0 as floats: 1 where u > 0, 0 where u == 0,
    and 1 where u is NaN (torch lets a NaN's gradient through). Each op after the first
    works in place on the new tensor."""
    return u.clamp_max(1.0).ceil_().nan_to_num_(nan=1.0)


def relu_grad(g: Tensor, u: Tensor) -> Tensor:
    """dL/dz = g * (u > 0) for u = max(0, z), with torch's rule that a NaN unit passes
    its gradient on.

    A plain backward (no graph of it wanted, nothing tracing it) makes one new tensor
    with two kernels (torch's own ReLU backward: one tensor, one kernel). For u >= 0 or
    NaN, (u != 0) is exactly (u > 0 or u is NaN), so

        m = (u != 0) as floats;   dL/dz = m * g   (multiplied into m)

    with the 0 a kept tensor rather than a number (see ``_constants``: ~4 us a call).
    Otherwise (double backward, vmap, compile, batched grads) the same product, out of
    place.
    """
    if not plain_backward(g):
        return g * relu_mask(u)
    return torch.ne(u, constant(0.0, u.dtype), out=torch.empty_like(g)).mul_(g)


@fast_apply
class ReLUFunction(Function):
    r"""u = max(0, z), element-wise; any shape.

    du/dz is 1 where z > 0 and 0 where z < 0. At z == 0 the function has no
    derivative; like torch we use 0 there (the subgradient that keeps dead
    units dead). With g = dL/du, same shape as z:

        dL/dz = g * (u > 0)

    The mask is read from the *output* u, not the input z: u > 0 exactly where
    z > 0, so z need not be kept, and an in-place forward (which overwrites z)
    loses nothing the backward needs. A NaN in z stays NaN in u, and its
    gradient passes through as in torch (NaN <= 0 is false).

    The mask is built in floating point (see ``relu_grad``) and multiplied in,
    because comparisons and selects on bool tensors run far slower than float
    arithmetic in torch's CPU kernels (4096 x 50: masked_fill ~430 us, this ~30 us).
    One consequence: where u == 0 and g itself is inf or NaN, the product 0 * g is
    NaN where torch gives 0.
    """

    # torch.func.vmap batches forward and backward as written: both use only torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, inplace: bool = False) -> Tensor:
        # (the int 0 keeps an integer z's dtype, as torch's relu does)
        return z.clamp_min_(0) if inplace else z.clamp_min(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(z)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (u,) = ctx.saved_tensors
        return relu_grad(g, u), None  # g * (u > 0)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, _: None) -> Tensor:
        """Forward mode: du = dz * (u > 0), the same mask pushing the tangent forward (in
        place when the layer was: the input's tangent becomes the output's)."""
        (u,) = ctx.saved_tensors
        return dz.mul_(relu_mask(u)) if ctx.inplace else dz * relu_mask(u)


@fast_apply
class LeakyReLUFunction(Function):
    r"""u = z if z > 0 else a z, element-wise (a: negative_slope).

        dL/dz = g * (1 if z > 0 else a)          (a at z == 0, as torch)

    For a >= 0 the sign is read from the output u (u > 0 exactly where z > 0), so an
    in-place call, which overwrites z, loses nothing; a negative slope flips the sign,
    so then z itself is saved, and torch refuses such a slope in place for that reason.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
        u = torch.where(z > 0, z, z * negative_slope)
        return z.copy_(u) if inplace else u

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, negative_slope, inplace = inputs
        if inplace:
            ctx.mark_dirty(z)
        ctx.save_for_backward(output if negative_slope >= 0 else z)
        ctx.save_for_forward(output if negative_slope >= 0 else z)
        ctx.negative_slope, ctx.inplace = negative_slope, inplace

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (s,) = ctx.saved_tensors  # u (or z): positive exactly where z is
        return torch.where(s > 0, g, g * ctx.negative_slope), None, None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, *_: None) -> Tensor:
        """Forward mode: du = dz * (1 if z > 0 else a)."""
        (s,) = ctx.saved_tensors
        du = torch.where(s > 0, dz, dz * ctx.negative_slope)
        return dz.copy_(du) if ctx.inplace else du


@fast_apply
class SigmoidFunction(Function):
    r"""u = 1 / (1 + exp(-z)), element-wise.

        du/dz = u (1 - u)        so   dL/dz = g * u * (1 - u)

    Only the output is needed, so only the output is saved. (For complex z, torch's
    gradient is dL/d(conj z): g * conj(u (1 - u)); conj is a no-op for real tensors.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.sigmoid(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor | None:
        (u,) = ctx.saved_tensors
        return g * (u * (1 - u)).conj() if ctx.needs_input_grad[0] else None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> Tensor:
        """Forward mode: du = dz u (1 - u) (no conjugate: the tangent goes forward)."""
        (u,) = ctx.saved_tensors
        return dz * (u * (1 - u))


@fast_apply
class TanhFunction(Function):
    r"""u = tanh(z), element-wise.

        du/dz = 1 - u^2          so   dL/dz = g * (1 - u^2)     (complex z: conj(1 - u^2))
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.tanh(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor | None:
        (u,) = ctx.saved_tensors
        return g * (1 - u * u).conj() if ctx.needs_input_grad[0] else None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> Tensor:
        """Forward mode: du = dz (1 - u^2)."""
        (u,) = ctx.saved_tensors
        return dz * (1 - u * u)


@fast_apply
class SiLUFunction(Function):
    r"""u = z s(z) with s the sigmoid, element-wise.

        du/dz = s + z s (1 - s) = s (1 + z (1 - s))     so   dL/dz = g * s * (1 + z (1 - s))

    s is recomputed from the saved input in backward, rather than saved.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return z * torch.sigmoid(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        (z,) = ctx.saved_tensors
        return g * _silu_slope(z).conj()  # (conj: for complex z, a no-op else)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> Tensor:
        """Forward mode: du = dz s (1 + z (1 - s))."""
        (z,) = ctx.saved_tensors
        return dz * _silu_slope(z)


def _silu_slope(z: Tensor) -> Tensor:
    """du/dz = s (1 + z (1 - s)) for u = z s(z)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@fast_apply
class GELUFunction(Function):
    r"""Gaussian error linear unit, element-wise.

    'none':  u = z P(z), P the standard normal CDF, p its density:
        du/dz = P(z) + z p(z)
    'tanh':  u = z/2 (1 + t), t = tanh(k (z + c z^3)), k = sqrt(2/pi), c = 0.044715:
        du/dz = (1 + t)/2 + z/2 (1 - t^2) k (1 + 3 c z^2)
    and dL/dz = g * du/dz.

    The forward value is torch's kernel's (one pass, as Softmax's is torch.softmax);
    the derivative is the formula above.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, approximate: str = "none") -> Tensor:
        return torch.nn.functional.gelu(z, approximate=approximate)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.approximate = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (z,) = ctx.saved_tensors
        if plain_backward(g):  # the same formula, fused or in place (below)
            return _gelu_grad(z, g, ctx.approximate), None
        return g * _gelu_slope(z, ctx.approximate), None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, _: None) -> Tensor:
        """Forward mode: du = dz du/dz, the same slope."""
        (z,) = ctx.saved_tensors
        return dz * _gelu_slope(z, ctx.approximate)


def _gelu_slope(z: Tensor, approximate: str) -> Tensor:
    """du/dz of GELU: P(z) + z p(z), or its tanh form's (see GELUFunction)."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))
        dt = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * dt
    cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    return cdf + z * pdf


def _gelu_grad_in_place(z: Tensor, g: Tensor, approximate: str) -> Tensor:
    """g (P(z) + z p(z)), the formula of ``_gelu_slope``, with every step but the first of
    each factor in place: two full-size temporaries where the plain form makes ten (each
    a fresh allocation, ~2x the time at GPT sizes). Only where no graph of the backward
    is wanted (``plain_backward``): in-place steps cannot be differentiated again."""
    if approximate == "tanh":
        return g * _gelu_slope(z, approximate)
    zp = (z * z).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).mul_(z)  # z p(z)
    return torch.erf(z * _INV_SQRT_2).add_(1).mul_(0.5).add_(zp).mul_(g)


@fusable(eager=_gelu_grad_in_place)
def _gelu_grad(z: Tensor, g: Tensor, approximate: str) -> Tensor:
    """g du/dz, the plain formula, compiled into one loop where that pays (_fuse.py)."""
    return g * _gelu_slope(z, approximate)


@fast_apply
class SoftmaxFunction(Function):
    r"""u = exp(z) / sum_j exp(z_j), along ``dim``.

    The Jacobian of one slice is diag(u) - u u^T, so for g = dL/du:
        dL/dz = u * (g - sum_j g_j u_j)          the sum along dim, kept for broadcasting
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, dim: int) -> Tensor:
        return torch.softmax(z, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (u,) = ctx.saved_tensors
        if plain_backward(g):  # the same line, compiled into fused kernels where it pays
            return _softmax_grad(u, g, ctx.dim), None
        return u * (g - (g * u).sum(ctx.dim, keepdim=True)), None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, _: None) -> Tensor:
        """Forward mode: the Jacobian diag(u) - u u^T is symmetric, so the tangent goes
        forward by the same line: du = u * (dz - sum_j dz_j u_j)."""
        (u,) = ctx.saved_tensors
        return u * (dz - (dz * u).sum(ctx.dim, keepdim=True))


@fast_apply
class LogSoftmaxFunction(Function):
    r"""u = z - log sum_j exp(z_j), along ``dim``.

    du_i/dz_k = [i == k] - softmax(z)_k, and softmax(z) = exp(u), so:
        dL/dz = g - exp(u) * sum_j g_j           the sum along dim, kept for broadcasting
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, dim: int) -> Tensor:
        return torch.log_softmax(z, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (u,) = ctx.saved_tensors
        if plain_backward(g):  # the same line, compiled into fused kernels where it pays
            return _log_softmax_grad(u, g, ctx.dim), None
        return g - torch.exp(u) * g.sum(ctx.dim, keepdim=True), None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, _: None) -> Tensor:
        """Forward mode: du_i = sum_k ([i == k] - softmax_k) dz_k = dz - sum_k e^u_k dz_k."""
        (u,) = ctx.saved_tensors
        return dz - (torch.exp(u) * dz).sum(ctx.dim, keepdim=True)


def _softmax_grad_in_place(u: Tensor, g: Tensor, dim: int) -> Tensor:
    """The formula with its last product in place. (u g - u sum(g u), one addcmul into
    g u, is 20% faster but rounds worse where g is near its weighted mean: the
    difference of two products, not the product of a difference, as torch's kernel.)"""
    return (g - (g * u).sum(dim, keepdim=True)).mul_(u)


@fusable(eager=_softmax_grad_in_place)
def _softmax_grad(u: Tensor, g: Tensor, dim: int) -> Tensor:
    return u * (g - (g * u).sum(dim, keepdim=True))


def _log_softmax_grad_in_place(u: Tensor, g: Tensor, dim: int) -> Tensor:
    """g - exp(u) sum(g) as one addcmul: three ops and two full-size tensors where the
    formula makes four and three."""
    return torch.addcmul(g, torch.exp(u), g.sum(dim, keepdim=True), value=-1)


@fusable(eager=_log_softmax_grad_in_place)
def _log_softmax_grad(u: Tensor, g: Tensor, dim: int) -> Tensor:
    return g - torch.exp(u) * g.sum(dim, keepdim=True)


@fast_apply
class HardswishFunction(Function):
    r"""u = z relu6(z + 3) / 6, element-wise: 0 for z <= -3, z for z >= 3, and
    z (z + 3) / 6 between, so

        du/dz = 0 for z < -3,   (2 z + 3) / 6 = z / 3 + 1/2 for -3 <= z <= 3,   1 for z > 3

    (at the kinks, the values torch's kernel takes: -1/2 at z = -3, 3/2 at z = 3).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.nn.functional.hardswish(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        (z,) = ctx.saved_tensors
        return _hardswish_times(g, z)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> Tensor:
        """Forward mode: du = dz du/dz, the same slope."""
        (z,) = ctx.saved_tensors
        return _hardswish_times(dz, z)


def _hardswish_times(t: Tensor, z: Tensor) -> Tensor:
    """t du/dz for u = hardswish(z): 0 below -3, t (z/3 + 1/2) on [-3, 3], t above."""
    return torch.where(z < -3, 0.0, torch.where(z <= 3, t * (z / 3 + 0.5), t))


@fast_apply
class HardsigmoidFunction(Function):
    r"""u = relu6(z + 3) / 6, element-wise: 0 for z <= -3, 1 for z >= 3, (z + 3) / 6
    between, so

        du/dz = 1/6 for -3 < z < 3, and 0 outside (0 at the kinks, as torch's kernel)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.nn.functional.hardsigmoid(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        (z,) = ctx.saved_tensors
        return torch.where((z > -3) & (z < 3), g / 6, 0.0)

    @staticmethod
    def jvp(ctx: Any, dz: Tensor) -> Tensor:
        """Forward mode: du = dz / 6 on (-3, 3), 0 outside."""
        (z,) = ctx.saved_tensors
        return torch.where((z > -3) & (z < 3), dz / 6, 0.0)


@fast_apply
class HardtanhFunction(Function):
    r"""u = clamp(z, lo, hi), element-wise (ReLU6 is lo = 0, hi = 6):

        du/dz = 1 for lo < z < hi, 0 outside (0 at the kinks, as torch's kernel)

    The mask is read from the output u (lo < u < hi exactly where lo < z < hi), so an
    in-place call, which overwrites z, loses nothing.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, lo: float, hi: float, inplace: bool = False) -> Tensor:
        return z.clamp_(lo, hi) if inplace else z.clamp(lo, hi)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, ctx.lo, ctx.hi, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(z)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (u,) = ctx.saved_tensors
        return torch.where((u > ctx.lo) & (u < ctx.hi), g, 0.0), None, None, None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor, *_: None) -> Tensor:
        """Forward mode: du = dz inside (lo, hi), 0 outside."""
        (u,) = ctx.saved_tensors
        du = torch.where((u > ctx.lo) & (u < ctx.hi), dz, 0.0)
        return dz.copy_(du) if ctx.inplace else du
