"""torch.nn.functional-style entry points: check the arguments, then call the Function.

Each function has the signature and semantics of its torch.nn.functional namesake;
where torch would crash deep inside a kernel or silently broadcast, these raise an
error that names the layer, the shapes or dtypes involved, and the fix.
"""

import torch
from torch import Tensor

from manual_grad.functions import LinearFunction, MSELossFunction, ReLUFunction
from manual_grad.functions.losses import REDUCTIONS


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul in on t's device, or None when it is off."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _to_float32_if_half(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _same_device(layer: str, **tensors: Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise RuntimeError(
            f"{layer}: tensors are on different devices ({listing}); move them to one "
            "device, e.g. model.to(input.device)."
        )


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight^T + bias, as ``torch.nn.functional.linear``.

    input: (*, in_features), weight: (out_features, in_features), bias: (out_features,).
    """
    if weight.dim() != 2:
        raise ValueError(
            f"linear: weight must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"linear: expected input of shape (*, in_features={in_features}), got shape "
            f"{tuple(input.shape)}; the last dimension must equal in_features "
            "(flatten images first, e.g. input.flatten(1))."
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(
            f"linear: bias must have shape ({out_features},), got {tuple(bias.shape)}"
        )
    _same_device("linear", input=input, weight=weight, bias=bias)
    cast = _autocast_dtype(input)
    if cast is not None and input.is_floating_point():
        # Mirror torch's autocast policy for linear: run it in the autocast dtype.
        input, weight = input.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    dtypes = {t.dtype for t in (input, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"linear: input is {input.dtype} but weight is {weight.dtype}"
            + (f" and bias is {bias.dtype}" if bias is not None else "")
            + "; convert one side, e.g. input.to(weight.dtype) or model.to(input.dtype)."
        )
    return LinearFunction.apply(input, weight, bias)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """max(0, input) element-wise, as ``torch.nn.functional.relu``.

    With ``inplace=True`` the input tensor is overwritten with the result (and
    returned), as in torch; the backward reads only the output, so nothing is lost.
    """
    return ReLUFunction.apply(input, inplace)


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
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"mse_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
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
    if _autocast_dtype(input) is not None:
        # torch's autocast runs mse_loss in float32: half-precision inputs are upcast
        input, target = _to_float32_if_half(input), _to_float32_if_half(target)
    if input.dtype != target.dtype:
        raise TypeError(
            f"mse_loss: input is {input.dtype} but target is {target.dtype}; convert "
            "the target, e.g. target.to(input.dtype)."
        )
    return MSELossFunction.apply(input, target, reduction)
