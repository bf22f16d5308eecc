"""Numbers as kept 0-dim tensors, for the eager backward passes.

A Python number in a tensor op (``g * 0.5``, ``u != 0``) is turned into a new 0-dim tensor
on every call. Measured on a 2-core CPU with torch 2.14, that costs ~1.5 us in plain code
and ~4 us inside a backward pass, where torch's whole ReLU backward node for a 64 x 50
batch takes ~18 us. The backward passes (and the single-pass forwards) make each such
number once as a CPU tensor and keep it: a 0-dim CPU tensor stands in for a number in an
op on a tensor of any device, exactly as the tensor torch would make of it does.
"""

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)
_MAX_KEPT = 1024  # (a new batch size makes new scales: cleared when full)
_kept: dict[tuple[float, torch.dtype], Tensor] = {}


def constant(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-dim CPU tensor, for ops on tensors of ``dtype``, made on the first
    call and kept. Its dtype is ``dtype``, or float32 for the half types, whose arithmetic
    with a number torch does in float32 (a half-precision constant would round it first).

    Only for ops run eagerly (not traced, no graph of them recorded): a tensor made under
    inference mode or under a tensor subclass's mode (e.g. FakeTensorMode) is used once
    and not kept, so what is kept is always a plain tensor."""
    kept = _kept.get((value, dtype))
    if kept is None:
        kept = torch.tensor(value, dtype=torch.float32 if dtype in _HALF else dtype,
                            device="cpu")
        if type(kept) is Tensor and not kept.is_inference():
            if len(_kept) >= _MAX_KEPT:
                _kept.clear()
            _kept[(value, dtype)] = kept
    return kept
