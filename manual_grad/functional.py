"""torch.nn.functional-style entry points: check the arguments, then call the Function.

Each function has the signature and semantics of its torch.nn.functional namesake;
where torch would crash deep inside a kernel or silently broadcast, these raise an
error that names the layer, the shapes or dtypes involved, and the fix.
"""

import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from manual_grad import _compat
from manual_grad.functions import (
    AdaptiveAvgPool2dFunction,
    AvgPool2dFunction,
    BatchNormFunction,
    BCEWithLogitsLossFunction,
    Conv2dFunction,
    CrossEntropyLossFunction,
    DropoutFunction,
    EmbeddingFunction,
    FlattenFunction,
    GELUFunction,
    GroupNormFunction,
    HardsigmoidFunction,
    HardswishFunction,
    HardtanhFunction,
    HuberLossFunction,
    L1LossFunction,
    LayerNormFunction,
    LeakyReLUFunction,
    LinearFunction,
    LinearReLUFunction,
    LinearReLUMSELossFunction,
    LogSoftmaxFunction,
    MatmulFunction,
    MaxPool2dFunction,
    MLPFunction,
    MLPMSELossFunction,
    MSELossFunction,
    ReLUFunction,
    RepeatHeadsFunction,
    RMSNormFunction,
    ScaledDotProductAttentionFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftmaxFunction,
    TanhFunction,
)
from manual_grad.functions._constants import _HALF
from manual_grad.functions._fast_apply import traced
from manual_grad.functions._fuse import fastest
from manual_grad.functions.losses import REDUCTIONS
from manual_grad.functions.single_pass import cut_up

# Whether autocast is on for any device: one C call (~0.1 us on a 2-core CPU), against
# ~0.6 us for torch.is_autocast_enabled(t.device.type), which makes a device object. The
# usual-case checks below use it and leave anything under autocast to the full checks,
# which ask about the input's own device.
_any_autocast = _compat.any_autocast

# The entry points on a training step's path (linear, relu, mse_loss, the fused blocks)
# call their Function's eager twin themselves unless traced() (see functions/_fast_apply).


def _dual(t: Tensor) -> bool:
    """Whether t carries a forward-mode tangent (torch.autograd.forward_ad)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _traced_in_place(input: Tensor, out: Tensor) -> Tensor:
    """The result of an in-place layer while traced (torch.func, torch.compile): there the
    Function runs out of place and its result is copied into the input. torch.func
    refuses a Function that returns its input as its output (mark_dirty), and torch.compile
    traces the copy into the same in-place write; values, gradients and the aliasing of
    input and result are those of the eager in-place call. The same route serves an input
    with a forward-mode tangent, whose copy carries the tangent along (torch's checks of
    batched tangents refuse the in-place tangent update of a Function)."""
    return input.copy_(out)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul in on t's device, or None when it is off."""
    if not _any_autocast():
        return None
    device_type = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device autocast has no notion of (meta): it never casts there
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Cast as torch's autocast does: float32/16 tensors only (float64 is left alone)."""
    if t is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return t
    return t.to(dtype)


# The device types whose autocast runs softmax, log_softmax and layer_norm in float32
# (torch registers those ops there with its float32 policy; CPU autocast leaves them
# alone). tests/test_autocast.py checks this set against torch's dispatcher.
FLOAT32_AUTOCAST_DEVICES = frozenset({"cuda", "xpu", "mps"})


_MaybeTensor = TypeVar("_MaybeTensor", Tensor, None)


def _float32(t: _MaybeTensor) -> _MaybeTensor:
    """A float16/bfloat16 tensor as float32; anything else (None too) as it is."""
    return t.float() if t is not None and t.dtype in _HALF else t


def _float32_under_autocast(input: Tensor, *others: Tensor | None) -> bool:
    """Whether autocast runs softmax / log_softmax / layer_norm on these tensors in
    float32: it is on for input's device, a device whose autocast casts those ops up, and
    one of the tensors is float16 or bfloat16 (which it would cast to float32)."""
    if not _any_autocast() or input.device.type not in FLOAT32_AUTOCAST_DEVICES:
        return False
    return (torch.is_autocast_enabled(input.device.type)
            and any(t is not None and t.dtype in _HALF for t in (input, *others)))


def _half_in_float32(layer: str, input: Tensor, **params: Tensor | None) -> bool:
    """Check a normalisation layer's dtypes as torch's kernels do, and say whether it is
    to compute in float32 and hand back the input's dtype.

    torch takes parameters (and running statistics) of the input's dtype, or float32 ones
    with a float16/bfloat16 input: the usual mixed-precision layout, where a bfloat16
    activation meets a layer whose parameters stay float32. A half input is normalised in
    float32 either way, as torch's kernels accumulate in float32."""
    for name, p in params.items():
        if p is not None and p.dtype != input.dtype and not (
                input.dtype in _HALF and p.dtype == torch.float32):
            raise TypeError(
                f"{layer}: input is {input.dtype} but {name} is {p.dtype}; parameters must "
                "have the input's dtype, or be float32 with a float16/bfloat16 input. "
                "Convert one side, e.g. layer.to(input.dtype) or input.to(layer.weight.dtype)."
            )
    return input.dtype in _HALF


def _loss_inputs(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """torch's autocast runs every loss here in float32: half-precision inputs are upcast."""
    if _autocast_dtype(input) is None:
        return input, target
    return _float32(input), _float32(target)


def _can_read_values(t: Tensor) -> bool:
    """Whether t's values may be read on the host for a check: not on the meta device nor
    while torch.compile traces (no values exist), nor inside torch.func transforms (they
    are batched)."""
    return not t.is_meta and not torch.compiler.is_compiling() and \
        not _compat.is_functorch_wrapped(t)


def _same_device(layer: str, **tensors: Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise RuntimeError(
            f"{layer}: tensors are on different devices ({listing}); move them to one "
            "device, e.g. model.to(input.device)."
        )


def _linear_args(layer: str, input: Tensor, weight: Tensor,
                 bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check a linear layer's arguments; under autocast, cast them as torch would."""
    shape, dtype, device = weight.shape, weight.dtype, weight.device
    if (len(shape) == 2 and input.dim() and input.shape[-1] == shape[1]
            and input.dtype == dtype and input.device == device
            and (bias is None or (bias.shape == shape[:1] and bias.dtype == dtype
                                  and bias.device == device))
            and not _any_autocast()):
        return input, weight, bias  # the usual case, settled in a few reads (~1 us)
    if weight.dim() != 2:
        raise ValueError(
            f"{layer}: weight must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"{layer}: expected input of shape (*, in_features={in_features}), got shape "
            f"{tuple(input.shape)}; the last dimension must equal in_features "
            "(flatten images first, e.g. input.flatten(1))."
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(
            f"{layer}: bias must have shape ({out_features},), got {tuple(bias.shape)}"
        )
    _same_device(layer, input=input, weight=weight, bias=bias)
    cast = _autocast_dtype(input)
    if cast is not None:  # mirror torch's autocast policy for linear: the autocast dtype
        input, weight, bias = _autocast(input, cast), _autocast(weight, cast), \
            _autocast(bias, cast)
    dtypes = {t.dtype for t in (input, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"{layer}: input is {input.dtype} but weight is {weight.dtype}"
            + (f" and bias is {bias.dtype}" if bias is not None else "")
            + "; convert one side, e.g. input.to(weight.dtype) or model.to(input.dtype)."
        )
    return input, weight, bias


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight^T + bias, as ``torch.nn.functional.linear``.

    input: (*, in_features), weight: (out_features, in_features), bias: (out_features,).
    A 1-D weight (in_features,) gives ``input @ weight`` (+ a 0-D bias), of shape (*),
    as torch's does: the layer with one output, that dimension dropped. (torch takes
    the bias there only when the input is not 2-D, and so does this.)
    """
    if weight.dim() == 1 and (bias is None or (bias.dim() == 0 and input.dim() != 2)):
        one = None if bias is None else bias.reshape(1)
        return linear(input, weight.unsqueeze(0), one).squeeze(-1)
    args = _linear_args("linear", input, weight, bias)
    return LinearFunction.apply(*args) if traced() else LinearFunction._eager_apply(*args)


def linear_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """relu(linear(input, weight, bias)) in one fused Function (one Python call)."""
    args = _linear_args("linear_relu", input, weight, bias)
    if traced():
        return LinearReLUFunction.apply(*args)
    return LinearReLUFunction._eager_apply(*args)


def _mlp_args(layer: str, input: Tensor, weight1: Tensor, bias1: Tensor | None,
              weight2: Tensor, bias2: Tensor | None) -> tuple[Tensor, ...]:
    """Check a linear -> ReLU -> linear block's arguments (cast under autocast)."""
    input, weight1, bias1 = _linear_args(layer, input, weight1, bias1)
    if weight2.dim() != 2 or weight2.shape[1] != weight1.shape[0]:
        raise ValueError(
            f"{layer}: the second weight must have shape (out_features, {weight1.shape[0]}) "
            f"to follow the first layer's {weight1.shape[0]} outputs, got "
            f"{tuple(weight2.shape)}")
    if bias2 is not None and bias2.shape != (weight2.shape[0],):
        raise ValueError(f"{layer}: the second bias must have shape ({weight2.shape[0]},), "
                         f"got {tuple(bias2.shape)}")
    cast = _autocast_dtype(input)
    if cast is not None:  # under autocast the second layer runs in the autocast dtype too
        weight2, bias2 = _autocast(weight2, cast), _autocast(bias2, cast)
    if weight2.dtype != input.dtype:
        raise TypeError(f"{layer}: the second weight is {weight2.dtype} but the input is "
                        f"{input.dtype}; convert the layer, e.g. model.to(input.dtype).")
    return input, weight1, bias1, weight2, bias2


def mlp(input: Tensor, weight1: Tensor, bias1: Tensor | None, weight2: Tensor,
        bias2: Tensor | None) -> Tensor:
    """linear(relu(linear(input, weight1, bias1)), weight2, bias2) in one fused Function."""
    args = _mlp_args("mlp", input, weight1, bias1, weight2, bias2)
    return (MLPFunction.apply(*args) if traced() else MLPFunction._eager_apply(*args))[0]


def _single_pass_checks(layer: str, input: Tensor, out_features: int, target: Tensor,
                        reduction: str) -> Tensor:
    """Check a single-pass loss's input, target and reduction; the target, as (n, out)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{layer}: reduction must be 'mean' or 'sum', got {reduction!r}; for "
            "per-element losses compute the output and use mse_loss(..., reduction='none').")
    if input.dim() != 2:
        raise ValueError(f"{layer}: input must be 2-D (n, in_features), got shape "
                         f"{tuple(input.shape)}; flatten it first, e.g. input.flatten(1).")
    wanted = (len(input), out_features)
    if target.shape != wanted:
        if out_features == 1 and target.shape == wanted[:1]:
            target = target.unsqueeze(1)  # (n,) against one output: the seed's layout
        else:
            raise ValueError(
                f"{layer}: target shape {tuple(target.shape)} does not match the output's "
                f"{wanted}; give it the output's shape.")
    _same_device(layer, input=input, target=target)
    if target.dtype != input.dtype:
        raise TypeError(f"{layer}: input is {input.dtype} but target is {target.dtype}; "
                        "convert the target, e.g. target.to(input.dtype).")
    return target


def _may_sum_gradients() -> bool:
    """Whether a single-pass forward may sum gradients: not when none are wanted, nor in
    torch.func transforms or torch.compile, where backward recomputes them instead."""
    return torch.is_grad_enabled() and not traced()


def _with_grads(*tensors: Tensor | None) -> tuple[bool, ...] | None:
    """Which of ``tensors`` a single-pass forward should sum gradients for (None: none)."""
    if not _may_sum_gradients():
        return None
    flags = tuple(t is not None and t.requires_grad for t in tensors)
    return flags if any(flags) else None


# The single-pass losses sum their gradients in the forward pass, chunk by chunk, so that a
# large batch is read once rather than twice: a gain where memory is slow next to the
# arithmetic (this project's 2-core VM: 0.44x native for the seed's work), a loss where the
# batch fits in cache (a VM with 260 MiB of L3: 1.87x). Which holds is measured, not
# assumed: the first call for a shape, dtype, device and thread count times both ways and
# keeps the faster for the rest of the process. "always" or "never" (also from the
# environment variable MANUAL_GRAD_SINGLE_PASS) skips the measurement.
SINGLE_PASS = os.environ.get("MANUAL_GRAD_SINGLE_PASS", "auto")
_single_pass_choice: dict[tuple, bool] = {}


def single_pass_pays(key: tuple, single: Callable[..., Tensor], plain: Callable[..., Tensor],
                     tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether ``single(*tensors)`` is to be taken over ``plain(*tensors)`` (the same loss,
    and the same gradients): SINGLE_PASS, or the measured choice for ``key``."""
    if SINGLE_PASS != "auto":
        return SINGLE_PASS == "always"
    if torch.are_deterministic_algorithms_enabled():  # (a choice by timing would let two
        return False                                   # runs round differently)
    choice = _single_pass_choice.get(key)
    if choice is None:
        choice = _single_pass_choice[key] = _no_slower(single, plain, tensors)
    return choice


def _no_slower(single: Callable[..., Tensor], plain: Callable[..., Tensor],
               tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether single's forward and backward take no longer than plain's: the best of three
    calls each, taken in turn after one of each to warm up, on detached copies (the
    caller's tensors get no gradient from it)."""
    copies = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad)
                   for t in tensors)
    wanted = [t for t in copies if t is not None and t.requires_grad]
    device = next(t for t in copies if t is not None).device
    runs = [lambda fn=fn: torch.autograd.grad(fn(*copies), wanted) for fn in (single, plain)]
    return fastest(runs, device) == 0  # (a tie goes to the single pass)


def _plain_linear_relu_mse_loss(input: Tensor, weight: Tensor, bias: Tensor | None,
                                target: Tensor, reduction: str) -> Tensor:
    """linear_relu_mse_loss as three layers (the plain path; checked arguments)."""
    return mse_loss(relu(linear(input, weight, bias)), target, reduction=reduction)


def linear_relu_mse_loss(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                         reduction: str = "mean") -> Tensor:
    """``mse_loss(relu(linear(input, weight, bias)), target, reduction=reduction)``, the
    seed's whole computation, as one Function whose forward also sums the gradients while
    each chunk of ``input`` is in cache: one pass over the input instead of two.

    input: (n, in_features); target: (n, out_features), or (n,) when out_features is 1;
    reduction 'mean' or 'sum'. Under autocast it runs as the three separate layers, and
    so it does where that was measured faster (see SINGLE_PASS).
    """
    layer = "linear_relu_mse_loss"
    if _autocast_dtype(input) is not None:  # linear in the autocast dtype, the loss in fp32
        output = relu(linear(input, weight, bias))
        target = _single_pass_checks(layer, input, weight.shape[0], target, reduction)
        return mse_loss(output, target, reduction=reduction)
    input, weight, bias = _linear_args(layer, input, weight, bias)
    target = _single_pass_checks(layer, input, weight.shape[0], target, reduction)
    with_grads = _with_grads(input, weight, bias, target)

    def single(*tensors: Tensor | None) -> Tensor:
        return LinearReLUMSELossFunction.apply(*tensors, reduction, with_grads)[0]

    def plain(*tensors: Tensor | None) -> Tensor:
        return _plain_linear_relu_mse_loss(*tensors, reduction)

    tensors = (input, weight, bias, target)
    if with_grads is not None and cut_up(input, len(input)) and not single_pass_pays(
            (layer, input.shape, weight.shape, input.dtype, input.device, reduction,
             with_grads, torch.get_num_threads()), single, plain, tensors):
        return plain(*tensors)
    return single(*tensors)


def mlp_mse_loss(input: Tensor, weight1: Tensor, bias1: Tensor | None, weight2: Tensor,
                 bias2: Tensor | None, target: Tensor, reduction: str = "mean",
                 rows: Tensor | None = None) -> Tensor:
    """``mse_loss(mlp(input, weight1, bias1, weight2, bias2), target, reduction=reduction)``
    as one Function whose forward also sums every gradient (``MLPMSELossFunction``): a
    training step's gradients from one Python call forward and one backward.

    input: (n, in_features); target: (n, out_features), or (n,) when out_features is 1;
    reduction 'mean' or 'sum'. Under autocast it runs as ``mlp`` then ``mse_loss``.

    rows: optional indices (1-D, integer, each in [0, n)) of the batch in a dataset held
    whole in ``input`` and ``target``: the loss of ``input[rows]``, ``target[rows]``,
    with the rows gathered chunk by chunk as they are summed instead of copied out first
    (on a CPU a large batch's step then reads the data once). Where nothing is summed in
    forward (no gradients wanted, torch.func, torch.compile, autocast, or a dataset that
    itself requires grad) it is exactly the gathered call.
    """
    if rows is not None:
        return _mlp_mse_loss_of_rows(input, weight1, bias1, weight2, bias2, target,
                                     reduction, rows)
    if _usual_mlp_call(input, weight1, bias1, weight2, bias2, target, reduction):
        # settled in a few reads (the full checks below cost ~5 us a step; tensors on
        # two devices make torch's ops fail, and are named then)
        if target.dim() == 1:
            target = target.unsqueeze(1)
        with_grads = None
        if _may_sum_gradients():
            with_grads = (input.requires_grad, weight1.requires_grad,
                          bias1 is not None and bias1.requires_grad, weight2.requires_grad,
                          bias2 is not None and bias2.requires_grad, target.requires_grad)
        try:
            if with_grads is not None and cut_up(input, len(input)):
                tensors = (input, weight1, bias1, weight2, bias2, target)
                if not single_pass_pays(
                        ("mlp_mse_loss", input.shape, weight1.shape, weight2.shape,
                         input.dtype, input.device, reduction, with_grads,
                         torch.get_num_threads()),
                        lambda *t: MLPMSELossFunction.apply(*t, reduction, with_grads)[0],
                        lambda *t: mse_loss(mlp(*t[:5]), t[5], reduction=reduction),
                        tensors):
                    return mse_loss(mlp(*tensors[:5]), target, reduction=reduction)
            return MLPMSELossFunction.apply(input, weight1, bias1, weight2, bias2, target,
                                            reduction, with_grads)[0]
        except RuntimeError:
            _same_device("mlp_mse_loss", input=input, weight1=weight1, bias1=bias1,
                         weight2=weight2, bias2=bias2, target=target)
            raise
    layer = "mlp_mse_loss"
    if _autocast_dtype(input) is not None:  # the block in the autocast dtype, loss in fp32
        output = mlp(input, weight1, bias1, weight2, bias2)
        target = _single_pass_checks(layer, input, weight2.shape[0], target, reduction)
        return mse_loss(output, target, reduction=reduction)
    tensors = _mlp_args(layer, input, weight1, bias1, weight2, bias2)
    target = _single_pass_checks(layer, input, weight2.shape[0], target, reduction)
    return MLPMSELossFunction.apply(*tensors, target, reduction,
                                    _with_grads(*tensors, target))[0]


def _usual_mlp_call(input: Tensor, weight1: Tensor, bias1: Tensor | None, weight2: Tensor,
                    bias2: Tensor | None, target: Tensor, reduction: str) -> bool:
    """Whether mlp_mse_loss's arguments are the usual ones, every shape and dtype matching
    (no autocast): what the full checks would pass, read in a few attribute reads."""
    shape1, shape2, dtype = weight1.shape, weight2.shape, input.dtype
    return (len(shape1) == 2 and len(shape2) == 2 and input.dim() == 2
            and input.shape[1] == shape1[1] and shape2[1] == shape1[0]
            and weight1.dtype == dtype and weight2.dtype == dtype and target.dtype == dtype
            and (bias1 is None or (bias1.shape == shape1[:1] and bias1.dtype == dtype))
            and (bias2 is None or (bias2.shape == shape2[:1] and bias2.dtype == dtype))
            and (target.shape == (len(input), shape2[0])
                 or (shape2[0] == 1 and target.shape == input.shape[:1]))
            and reduction in ("mean", "sum") and not _any_autocast())


def _mlp_mse_loss_of_rows(input: Tensor, weight1: Tensor, bias1: Tensor | None,
                          weight2: Tensor, bias2: Tensor | None, target: Tensor,
                          reduction: str, rows: Tensor) -> Tensor:
    """mlp_mse_loss of the batch ``rows`` of a dataset (see mlp_mse_loss)."""
    layer = "mlp_mse_loss"
    if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{layer}: rows must be a 1-D tensor of int64 (or int32) indices, "
                        f"got {rows.dtype} of shape {tuple(rows.shape)}")
    if rows.device != input.device:
        raise ValueError(f"{layer}: rows are on {rows.device} but input is on "
                         f"{input.device}; move them, e.g. rows.to(input.device)")
    if input.dim() != 2 or target.shape[:1] != input.shape[:1]:
        raise ValueError(f"{layer}: with rows, input must be the whole dataset (N, "
                         f"in_features) and target (N, ...) with the same N; got "
                         f"{tuple(input.shape)} and {tuple(target.shape)}")
    try:
        if (input.requires_grad or target.requires_grad or not _may_sum_gradients()
                or _any_autocast()):
            # nothing summed in forward: the gathered call (index_select, like the
            # summing path, takes indices in [0, N) only)
            return mlp_mse_loss(input.index_select(0, rows), weight1, bias1, weight2,
                                bias2, target.index_select(0, rows), reduction)
        if _usual_mlp_call(input, weight1, bias1, weight2, bias2, target, reduction):
            tensors: tuple[Tensor | None, ...] = (input, weight1, bias1, weight2, bias2)
            if target.dim() == 1:
                target = target.unsqueeze(1)
        else:
            tensors = _mlp_args(layer, input, weight1, bias1, weight2, bias2)
            target = _single_pass_checks(layer, input, weight2.shape[0], target, reduction)
        # (gradients may be summed, checked above; input and target need none)
        w1, b1, w2, b2 = tensors[1:]
        with_grads = (False, w1.requires_grad, b1 is not None and b1.requires_grad,
                      w2.requires_grad, b2 is not None and b2.requires_grad, False)
        flags = with_grads if any(with_grads) else None

        def single(*t: Tensor | None) -> Tensor:
            return MLPMSELossFunction.apply(*t[:5], t[5], reduction, flags, rows)[0]

        def gathered(*t: Tensor | None) -> Tensor:  # the batch copied out, then one pass
            return mlp_mse_loss(t[0].index_select(0, rows), *t[1:5],
                                t[5].index_select(0, rows), reduction)

        # reading the rows from the dataset chunk by chunk pays where the batch would not
        # stay in cache; measured, as the single pass is (see SINGLE_PASS)
        every = (*tensors, target)
        if flags is not None and cut_up(input, len(rows)) and not single_pass_pays(
                (layer + " rows", input.shape[1], len(rows), w1.shape, w2.shape, input.dtype,
                 input.device, reduction, flags, torch.get_num_threads()),
                single, gathered, every):
            return gathered(*every)
        return single(*every)
    except (RuntimeError, IndexError):
        _same_device(layer, input=input, weight1=weight1, bias1=bias1, weight2=weight2,
                     bias2=bias2, target=target)
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < len(input)):
            raise IndexError(
                f"{layer}: rows must index the {len(input)} rows of input (0 <= i < "
                f"{len(input)}), got values from {int(rows.min())} to {int(rows.max())}"
            ) from None
        raise


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """max(0, input) element-wise, as ``torch.nn.functional.relu``.

    With ``inplace=True`` the input tensor is overwritten with the result (and
    returned), as in torch; the backward reads only the output, so nothing is lost.
    """
    if input.dtype == torch.bool:
        raise TypeError("relu: boolean inputs are not supported, as in torch; convert "
                        "them first, e.g. input.float()")
    if traced():
        out = ReLUFunction.apply(input, False)
        return _traced_in_place(input, out) if inplace else out
    if inplace and _dual(input):
        return _traced_in_place(input, ReLUFunction._eager_apply(input, False))
    return ReLUFunction._eager_apply(input, inplace)


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Mean squared error, as ``torch.nn.functional.mse_loss``.

    Unlike torch, a target whose shape would broadcast the loss to a shape larger
    than the input's (the classic (N, 1) prediction against an (N,) target, which
    gives an (N, N) loss) is an error, not a warning. A target that broadcasts to
    the input's shape (e.g. a scalar) is accepted, as in torch.
    """
    if (target.shape == input.shape and input.dtype == target.dtype
            and input.device == target.device and reduction in REDUCTIONS
            and size_average is None and reduce is None and not _any_autocast()):
        if traced():  # the usual case, checked
            return MSELossFunction.apply(input, target, reduction)
        return MSELossFunction._eager_apply(input, target, reduction)
    if size_average is not None or reduce is not None:
        reduction = _compat.legacy_reduction(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"mse_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    shape = input.shape
    if target.shape != shape:  # (torch.broadcast_shapes costs ~30 us: only when needed)
        try:
            shape = torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError:
            shape = None
    if shape != input.shape:
        hint = ""
        if input.dim() == target.dim() + 1 and input.shape[-1] == 1:
            hint = " Here: use input.squeeze(-1), or target.unsqueeze(-1)."
        elif target.dim() == input.dim() + 1 and target.shape[-1] == 1:
            hint = " Here: use target.squeeze(-1), or input.unsqueeze(-1)."
        raise ValueError(
            f"mse_loss: input shape {tuple(input.shape)} and target shape "
            f"{tuple(target.shape)} do not match"
            + (f" and would broadcast to {tuple(shape)}" if shape is not None else "")
            + "; give the target the input's shape (e.g. target.view_as(input))."
            + hint
        )
    _same_device("mse_loss", input=input, target=target)
    input, target = _loss_inputs(input, target)
    if input.dtype != target.dtype:
        raise TypeError(
            f"mse_loss: input is {input.dtype} but target is {target.dtype}; convert "
            "the target, e.g. target.to(input.dtype)."
        )
    return MSELossFunction.apply(input, target, reduction)


# ---- activations --------------------------------------------------------------------


def _floating(name: str, input: Tensor) -> None:
    """Refuse a tensor of integers or booleans, as torch's kernel for ``name`` does."""
    if not (input.is_floating_point() or input.is_complex()):
        raise TypeError(f"{name}: expected a floating-point tensor, got {input.dtype}, as "
                        f"torch's {name} does; convert it first, e.g. input.float()")


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.leaky_relu``."""
    _floating("leaky_relu", input)
    if inplace and negative_slope < 0:
        raise ValueError(
            f"leaky_relu: inplace=True needs negative_slope >= 0 (got {negative_slope}): the "
            "backward reads the sign from the overwritten output; use inplace=False")
    if inplace and (traced() or _dual(input)):  # (the Function saves its output)
        return _traced_in_place(input, LeakyReLUFunction.apply(input, negative_slope, False))
    return LeakyReLUFunction.apply(input, negative_slope, inplace)


def sigmoid(input: Tensor) -> Tensor:
    """As ``torch.sigmoid``."""
    return SigmoidFunction.apply(input)


def tanh(input: Tensor) -> Tensor:
    """As ``torch.tanh``."""
    return TanhFunction.apply(input)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.silu``; ``inplace`` writes the result into ``input`` (see
    ``_elementwise_in_place``: the backward needs the z it overwrites)."""
    return _elementwise_in_place("silu", SiLUFunction, input, inplace)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """As ``torch.nn.functional.gelu``: ``approximate`` is 'none' or 'tanh'."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _floating("gelu", input)
    return GELUFunction.apply(input, approximate)


def _softmax_dim(name: str, input: Tensor, dim: int | None) -> int:
    if dim is None:  # torch's legacy rule, without its deprecation warning's ambiguity
        dim = 0 if input.dim() in (0, 1, 3) else 1
    if not -max(input.dim(), 1) <= dim < max(input.dim(), 1):
        raise IndexError(f"{name}: dim {dim} is out of range for an input of shape "
                         f"{tuple(input.shape)}")
    return dim


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """As ``torch.nn.functional.softmax`` (float32 under CUDA autocast, as torch's);
    ``dtype`` casts the input first, as torch's does."""
    dim = _softmax_dim("softmax", input, dim)
    if dtype is not None:
        input = input.to(dtype)
    elif _float32_under_autocast(input):
        input = input.float()
    return SoftmaxFunction.apply(input, dim)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """As ``torch.nn.functional.log_softmax`` (float32 under CUDA autocast, as torch's);
    ``dtype`` casts the input first, as torch's does."""
    dim = _softmax_dim("log_softmax", input, dim)
    if dtype is not None:
        input = input.to(dtype)
    elif _float32_under_autocast(input):
        input = input.float()
    return LogSoftmaxFunction.apply(input, dim)


# ---- losses -------------------------------------------------------------------------


def _check_loss(name: str, input: Tensor, target: Tensor, reduction: str) -> None:
    """Call on the inputs as _loss_inputs returned them."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _same_device(name, input=input, target=target)
    if target.is_floating_point() and input.dtype != target.dtype:
        raise TypeError(f"{name}: input is {input.dtype} but target is {target.dtype}; "
                        "convert the target, e.g. target.to(input.dtype).")


def _check_same_shape(name: str, input: Tensor, target: Tensor) -> None:
    if input.shape != target.shape:
        raise ValueError(f"{name}: input shape {tuple(input.shape)} and target shape "
                         f"{tuple(target.shape)} differ; give the target the input's shape "
                         "(e.g. target.view_as(input)).")


def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """As ``torch.nn.functional.l1_loss``; shapes must match (no silent broadcast)."""
    input, target = _loss_inputs(input, target)
    _check_loss("l1_loss", input, target, reduction)
    _check_same_shape("l1_loss", input, target)
    return L1LossFunction.apply(input, target, reduction)


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean",
               delta: float = 1.0) -> Tensor:
    """As ``torch.nn.functional.huber_loss``; shapes must match (no silent broadcast)."""
    input, target = _loss_inputs(input, target)
    _check_loss("huber_loss", input, target, reduction)
    _check_same_shape("huber_loss", input, target)
    if delta <= 0:
        raise ValueError(f"huber_loss: delta must be positive, got {delta}")
    return HuberLossFunction.apply(input, target, reduction, delta)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """As ``torch.nn.functional.binary_cross_entropy_with_logits``. The loss has the
    input's dtype, as torch's, when ``weight`` or ``pos_weight`` has another (it is
    computed in the promoted dtype, then rounded)."""
    input, target = _loss_inputs(input, target)
    _check_loss("binary_cross_entropy_with_logits", input, target, reduction)
    _check_same_shape("binary_cross_entropy_with_logits", input, target)
    loss = BCEWithLogitsLossFunction.apply(input, target, weight, pos_weight, reduction)
    return loss if loss.dtype == input.dtype else loss.to(input.dtype)


def _within(t: Tensor, n: int) -> bool:
    """Whether every value of the integer tensor t is in 0..n-1: one reduction."""
    low, high = torch.aminmax(t)
    return 0 <= int(low) and int(high) < n


def _out_of_range(t: Tensor, n: int) -> int:
    return int(t.max()) if int(t.max()) >= n else int(t.min())


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """As ``torch.nn.functional.cross_entropy``: logits (N, C, *) or (C,); target class
    indices (N, *) or () of int64, or class probabilities shaped like the input."""
    input, target = _loss_inputs(input, target)
    _check_loss("cross_entropy", input, target, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if target.is_floating_point():
        _check_same_shape("cross_entropy", input, target)
        if ignore_index >= 0:
            raise ValueError(
                f"cross_entropy: ignore_index={ignore_index} does not apply to class-"
                "probability targets (torch refuses it too); leave it at its default, "
                "or give class indices")
    else:
        expected = (input.shape[0], *input.shape[2:]) if input.dim() > 1 else ()
        if tuple(target.shape) != tuple(expected):
            raise ValueError(
                f"cross_entropy: logits of shape {tuple(input.shape)} (classes on dim "
                f"{1 if input.dim() > 1 else 0}) need class-index targets of shape "
                f"{tuple(expected)}, got {tuple(target.shape)}")
        if target.numel() and _can_read_values(target):
            _check_classes(target, ignore_index, n_classes)
    if weight is not None and weight.shape != (n_classes,):
        raise ValueError(f"cross_entropy: weight must have shape ({n_classes},), got "
                         f"{tuple(weight.shape)}")
    return CrossEntropyLossFunction.apply(input, target, weight, ignore_index, reduction,
                                          label_smoothing)


def _check_classes(target: Tensor, ignore_index: int, n_classes: int) -> None:
    """Refuse class indices out of 0..n_classes-1 other than ignore_index, as torch's
    nll_loss does. One reduction (aminmax) where every index is in range; the ignored
    entries are set aside only when some is not."""
    if _within(target, n_classes):
        return
    kept = target[target != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n_classes):
        raise IndexError(
            f"cross_entropy: target holds class {_out_of_range(kept, n_classes)} "
            f"but the input has {n_classes} classes (0..{n_classes - 1})")


# ---- normalisation and dropout ------------------------------------------------------


def layer_norm(input: Tensor, normalized_shape: list[int] | tuple[int, ...],
               weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """As ``torch.nn.functional.layer_norm``: float32 parameters with a float16/bfloat16
    input give the input's dtype, and CUDA autocast runs it in float32, as torch's do."""
    shape = tuple(normalized_shape)
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(f"layer_norm: expected input of shape (*, {', '.join(map(str, shape))})"
                         f" (normalized_shape), got {tuple(input.shape)}")
    if _float32_under_autocast(input, weight, bias):  # then the output is float32 too
        input, weight, bias = _float32(input), _float32(weight), _float32(bias)
    if _half_in_float32("layer_norm", input, weight=weight, bias=bias):
        return LayerNormFunction.apply(input.float(), len(shape), _float32(weight),
                                       _float32(bias), eps)[0].to(input.dtype)
    return LayerNormFunction.apply(input, len(shape), weight, bias, eps)[0]


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """As ``torch.nn.functional.batch_norm``: in training, normalise with the batch's
    statistics and move the running ones towards them by ``momentum``. Float32 parameters
    and statistics with a float16/bfloat16 input give the input's dtype, as torch's do."""
    _batch_norm_checks(input, training, eps)
    if input.dim() < 2:  # empty, which torch runs too: nothing to normalise
        return input.clone()
    half = _half_in_float32("batch_norm", input, weight=weight, bias=bias,
                            running_mean=running_mean, running_var=running_var)
    x = input
    if half:  # a half input is normalised in float32
        x, weight, bias = input.float(), _float32(weight), _float32(bias)
    if training:
        out, mean, var = BatchNormFunction.apply(x, weight, bias, None, None, eps)
        if running_mean is not None and input.numel():  # an empty batch moves nothing
            with torch.no_grad():  # towards the batch's mean and unbiased variance
                m = input.numel() // input.shape[1]
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
    else:
        if half:
            running_mean, running_var = _float32(running_mean), _float32(running_var)
        out = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, eps)[0]
    return out.to(input.dtype) if half else out


def _batch_norm_checks(input: Tensor, training: bool, eps: float) -> None:
    """Refuse what torch's batch_norm refuses; an empty batch is accepted, as torch's."""
    if input.dim() < 2 and input.numel():
        raise ValueError(f"batch_norm: expected input (N, C) or (N, C, *), got "
                         f"{tuple(input.shape)}")
    if training and input.dim() >= 2 and input.numel() // input.shape[1] == 1:
        raise ValueError(f"batch_norm: training needs more than one value per channel, "
                         f"got input of shape {tuple(input.shape)}; use a batch of at "
                         "least 2, or eval mode")
    if training and not eps > 0:
        raise ValueError(f"batch_norm: eps must be positive in training, got {eps}, as in "
                         "torch (the variance of a constant channel is 0)")


def dropout(input: Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.dropout`` (a different random stream than torch's)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    # the mask is drawn here, outside the Function: under torch.func.vmap this draw
    # follows vmap's randomness setting ('different' per sample, or 'same')
    keep = torch.rand_like(input) >= p
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    if inplace and (traced() or _dual(input)):  # (the Function saves only the mask)
        return _traced_in_place(input, DropoutFunction.apply(input, keep, scale, False))
    return DropoutFunction.apply(input, keep, scale, inplace)


# ---- convolution, pooling, shape ----------------------------------------------------


def _pair(name: str, what: str, v: int | tuple[int, ...]) -> tuple[int, int]:
    """An int, or a sequence of one or two ints, as the pair torch's 2-d kernels expand
    it to."""
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2:
        raise ValueError(f"{name}: {what} must be an int, or a sequence of one or two "
                         f"ints, got {v!r}")
    return pair  # type: ignore[return-value]


def _pool_stride(name: str, stride: int | tuple[int, ...] | None,
                 kernel: tuple[int, int]) -> tuple[int, int]:
    """A pooling layer's stride: the kernel size when None or empty, as in torch."""
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        return kernel
    return _pair(name, "stride", stride)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
           stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1) -> Tensor:
    """As ``torch.nn.functional.conv2d``: input (N, C, H, W) or (C, H, W)."""
    if input.dim() not in (3, 4):
        raise ValueError(f"conv2d: expected input (N, C, H, W) or (C, H, W), got "
                         f"{tuple(input.shape)}")
    if input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                      groups).squeeze(0)
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"conv2d: input has {input.shape[1]} channels (shape {tuple(input.shape)}) but the "
            f"weight {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups}")
    stride, dilation = _pair("conv2d", "stride", stride), _pair("conv2d", "dilation", dilation)
    kh, kw = weight.shape[2:]
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        if stride != (1, 1):
            raise ValueError("conv2d: padding='same' needs stride 1, as in torch")
        totals = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
        if any(t % 2 for t in totals):  # torch pads one side more; do that before the layer
            input = torch.nn.functional.pad(
                input, (totals[1] // 2, totals[1] - totals[1] // 2,
                        totals[0] // 2, totals[0] - totals[0] // 2))
            padding = (0, 0)
        else:
            padding = (totals[0] // 2, totals[1] // 2)
    padding = _pair("conv2d", "padding", padding)
    _same_device("conv2d", input=input, weight=weight, bias=bias)
    cast = _autocast_dtype(input)
    if cast is not None:
        input, weight, bias = _autocast(input, cast), _autocast(weight, cast), \
            _autocast(bias, cast)
    if input.dtype != weight.dtype:
        raise TypeError(f"conv2d: input is {input.dtype} but weight is {weight.dtype}; "
                        "convert one side, e.g. input.to(weight.dtype).")
    return Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)


def max_pool2d(input: Tensor, kernel_size: int | tuple[int, int],
               stride: int | tuple[int, int] | None = None, padding: int | tuple[int, int] = 0,
               dilation: int | tuple[int, int] = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """As ``torch.nn.functional.max_pool2d``."""
    k = _pair("max_pool2d", "kernel_size", kernel_size)
    s = _pool_stride("max_pool2d", stride, k)
    out, indices = MaxPool2dFunction.apply(input, k, s, _pair("max_pool2d", "padding", padding),
                                           _pair("max_pool2d", "dilation", dilation), ceil_mode)
    return (out, indices) if return_indices else out


def avg_pool2d(input: Tensor, kernel_size: int | tuple[int, int],
               stride: int | tuple[int, int] | None = None, padding: int | tuple[int, int] = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """As ``torch.nn.functional.avg_pool2d``."""
    k = _pair("avg_pool2d", "kernel_size", kernel_size)
    s = _pool_stride("avg_pool2d", stride, k)
    return AvgPool2dFunction.apply(input, k, s, _pair("avg_pool2d", "padding", padding),
                                   ceil_mode, count_include_pad, divisor_override)


def flatten(input: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """As ``torch.flatten`` (start_dim 0 by default; ``nn.Flatten``'s is 1)."""
    return FlattenFunction.apply(input, start_dim, end_dim)


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """As ``torch.nn.functional.embedding`` (dense gradients only)."""
    if sparse:
        raise NotImplementedError("embedding: sparse=True is not supported by manual_grad; "
                                  "its gradient is always dense")
    if input.is_floating_point():
        raise TypeError(f"embedding: indices must be integers, got {input.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim), "
                         f"got shape {tuple(weight.shape)}")
    num = weight.shape[0]
    if _can_read_values(input) and input.numel() and not _within(input, num):
        bad = _out_of_range(input, num)
        raise IndexError(f"embedding: index {bad} is out of range for {weight.shape[0]} "
                         f"embeddings (0..{weight.shape[0] - 1})")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if max_norm is not None:  # torch renormalises the looked-up rows in place, as here
        with torch.no_grad():
            torch.embedding_renorm_(weight, input.reshape(-1), max_norm, norm_type)
    return EmbeddingFunction.apply(input.long(), weight, padding_idx, scale_grad_by_freq)


# ---- the layers real models still needed: attention and the rest of the zoo ----------


def _elementwise_in_place(name: str, fn, input: Tensor, inplace: bool) -> Tensor:
    """An element-wise Function whose backward reads its input z: in place (which
    overwrites z) it runs on a copy of z when a gradient may be wanted, as torch's
    autograd keeps one for its own in-place ops, and writes the result into input."""
    _floating(name, input)
    if not inplace:
        return fn.apply(input)
    if traced() or (torch.is_grad_enabled() and input.requires_grad):
        return input.copy_(fn.apply(input.clone()))
    return input.copy_(fn.apply(input))  # no gradient: nothing to keep


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.hardswish``."""
    return _elementwise_in_place("hardswish", HardswishFunction, input, inplace)


def hardtanh(input: Tensor, min_val: float = -1.0, max_val: float = 1.0,
             inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.hardtanh`` (ReLU6 is hardtanh(input, 0, 6))."""
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val ({min_val}) must not exceed max_val ({max_val})")
    if input.dtype == torch.bool:
        raise TypeError("hardtanh: boolean inputs are not supported, as in torch")
    if inplace and (traced() or _dual(input)):  # (the Function saves its output)
        return _traced_in_place(input, HardtanhFunction.apply(input, min_val, max_val, False))
    return HardtanhFunction.apply(input, min_val, max_val, inplace)


def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.relu6``: hardtanh(input, 0, 6)."""
    return hardtanh(input, 0.0, 6.0, inplace)


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """As ``torchvision.ops.stochastic_depth``: in training, zero each sample ('row') or
    the whole batch ('batch') with probability p and scale the rest by 1 / (1 - p): a
    dropout whose mask is shared along a sample, so DropoutFunction's backward."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stochastic_depth: p must be in [0, 1], got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"stochastic_depth: mode must be 'batch' or 'row', got {mode!r}")
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.dim() - 1) if mode == "row" else [1] * input.dim()
    keep = torch.rand(size, device=input.device) >= p
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return DropoutFunction.apply(input, keep, scale, False)


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """As ``torch.nn.functional.hardsigmoid``."""
    return _elementwise_in_place("hardsigmoid", HardsigmoidFunction, input, inplace)


def adaptive_avg_pool2d(input: Tensor, output_size: int | None | tuple[int | None, ...]
                        ) -> Tensor:
    """As ``torch.nn.functional.adaptive_avg_pool2d``: input (N, C, H, W) or (C, H, W);
    an output size of None keeps that dimension."""
    if input.dim() not in (3, 4):
        raise ValueError(f"adaptive_avg_pool2d: expected input (N, C, H, W) or (C, H, W), "
                         f"got {tuple(input.shape)}")
    pair = _pair("adaptive_avg_pool2d", "output_size",
                 output_size if output_size is not None else (None, None))  # type: ignore
    size = tuple(input.shape[-2 + i] if o is None else o for i, o in enumerate(pair))
    return AdaptiveAvgPool2dFunction.apply(input, size)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """As ``torch.nn.functional.group_norm``: input (N, C, *), C divisible by num_groups."""
    if input.dim() < 2 or input.shape[1] % num_groups:
        raise ValueError(f"group_norm: expected input (N, C, *) with C divisible by "
                         f"num_groups={num_groups}, got {tuple(input.shape)}")
    if input.shape[1] == 0 or math.prod(input.shape[2:]) == 0:
        raise ValueError(f"group_norm: expected channels and positions (N, C, *), none "
                         f"empty, got {tuple(input.shape)}, as torch")
    if _half_in_float32("group_norm", input, weight=weight, bias=bias):
        return GroupNormFunction.apply(input.float(), num_groups, _float32(weight),
                                       _float32(bias), eps)[0].to(input.dtype)
    return GroupNormFunction.apply(input, num_groups, weight, bias, eps)[0]


def rms_norm(input: Tensor, normalized_shape: list[int] | tuple[int, ...],
             weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """As ``torch.nn.functional.rms_norm``; eps None is the input dtype's machine
    epsilon, as torch's."""
    shape = tuple(normalized_shape)
    if not shape:
        raise ValueError("rms_norm: normalized_shape must have at least one dim, as in torch")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"rms_norm: expected input of shape (*, {', '.join(map(str, shape))})"
                         f" (normalized_shape), got {tuple(input.shape)}")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if _half_in_float32("rms_norm", input, weight=weight):
        return RMSNormFunction.apply(input.float(), len(shape), _float32(weight),
                                     eps).to(input.dtype)
    return RMSNormFunction.apply(input, len(shape), weight, eps)


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
           stride: int | tuple[int] = 1, padding: str | int | tuple[int] = 0,
           dilation: int | tuple[int] = 1, groups: int = 1) -> Tensor:
    """As ``torch.nn.functional.conv1d``: input (N, C, L) or (C, L). A 1-d convolution is
    a 2-d one over images of height 1, so it runs Conv2dFunction's hand-derived backward
    on the input and weight seen with a height of 1 (views)."""
    if input.dim() not in (2, 3) or weight.dim() != 3:
        raise ValueError(f"conv1d: expected input (N, C, L) or (C, L) and weight (O, C/groups,"
                         f" K), got {tuple(input.shape)} and {tuple(weight.shape)}")
    pad = padding if isinstance(padding, str) else (0, _single("conv1d", "padding", padding))
    return conv2d(input.unsqueeze(-2), weight.unsqueeze(-2), bias,
                  (1, _single("conv1d", "stride", stride)), pad,
                  (1, _single("conv1d", "dilation", dilation)), groups).squeeze(-2)


def _single(name: str, what: str, v: int | tuple[int, ...]) -> int:
    """An int, or a sequence of one int, as torch's 1-d kernels take it."""
    one = (v,) if isinstance(v, int) else tuple(v)
    if len(one) != 1:
        raise ValueError(f"{name}: {what} must be an int or a sequence of one int, got {v!r}")
    return one[0]


def matmul(input: Tensor, other: Tensor) -> Tensor:
    """input @ other for tensors of 2 or more dims (batch dims broadcast), with the
    backward of MatmulFunction."""
    if input.dim() < 2 or other.dim() < 2:
        raise ValueError(f"matmul: expected tensors of 2 or more dims, got shapes "
                         f"{tuple(input.shape)} and {tuple(other.shape)}; unsqueeze a vector")
    cast = _autocast_dtype(input)
    if cast is not None:  # as torch's matmul under autocast: in the autocast dtype
        input, other = _autocast(input, cast), _autocast(other, cast)
    return MatmulFunction.apply(input, other)


# the most scores one chunk of attention holds at a time (batch x rows x keys): 4 MiB of
# float32. Attention that fits is one chunk whose weights backward keeps (as torch's math
# does); larger attention is chunked and recomputed, its memory linear in the length.
ATTENTION_CHUNK_ELEMENTS = 2**20


def attention_rows(batch: int, L: int, S: int) -> int:
    """How many query rows one chunk of attention takes: all L when their scores fit in
    ATTENTION_CHUNK_ELEMENTS, else as many as fit (at least one)."""
    return max(1, min(max(L, 1), ATTENTION_CHUNK_ELEMENTS // max(batch * S, 1)))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """As ``torch.nn.functional.scaled_dot_product_attention``: softmax(q k^T scale +
    mask) v, with the backward of ScaledDotProductAttentionFunction, computed in chunks
    of query rows when the scores would be large (without dropout, memory then grows
    linearly in the sequence length; dropout keeps a boolean mask of every score).

    query (*, L, E), key (*, S, E), value (*, S, Ev); attn_mask bool (True: may attend)
    or float (added), broadcast to (*, L, S); is_causal masks keys after each query;
    scale defaults to 1 / sqrt(E); enable_gqa lets key and value have fewer heads (dim
    -3) than query, each shared by a group of query heads.
    """
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError("scaled_dot_product_attention: query, key and value need at least "
                         f"2 dims, got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: query (*, L, E) and key (*, S, E) "
                         f"must share E, and key and value S; got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal=True, not "
                         "both (as torch); fold the causal mask into attn_mask")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got "
                         f"{dropout_p}")
    cast = _autocast_dtype(query)
    if cast is not None:
        query, key, value = (_autocast(t, cast) for t in (query, key, value))
    if len({query.dtype, key.dtype, value.dtype}) > 1:
        raise TypeError(f"scaled_dot_product_attention: query, key and value must share a "
                        f"dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if heads % kv_heads or value.shape[-3] != kv_heads:
            raise ValueError(f"scaled_dot_product_attention: with enable_gqa, query's "
                             f"{heads} heads must be a multiple of key's and value's, got "
                             f"{kv_heads} and {value.shape[-3]}")
        key = RepeatHeadsFunction.apply(key, heads // kv_heads)
        value = RepeatHeadsFunction.apply(value, heads // kv_heads)
    L, S = query.shape[-2], key.shape[-2]
    bias = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device
                           ).masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        bias = attn_mask.to(query.dtype) if cast is not None else attn_mask
    batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2],
                                         () if bias is None else bias.shape[:-2])
    keep, keep_scale = None, 1.0
    if dropout_p > 0.0:
        # drawn here, outside the Function, so that torch.func.vmap follows its
        # randomness setting; one byte a score
        keep = torch.rand(*batch_shape, L, S, device=query.device) >= dropout_p
        keep_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
    if scale is None:
        scale = 1.0 / float(query.shape[-1]) ** 0.5
    rows = attention_rows(math.prod(batch_shape), L, S)
    return ScaledDotProductAttentionFunction.apply(query, key, value, bias, keep, scale,
                                                   keep_scale, is_causal, rows)

