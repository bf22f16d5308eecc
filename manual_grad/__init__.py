"""manual_grad: neural-network layers whose backward passes are derived by hand.

Swap ``torch.nn.Linear / ReLU / MSELoss`` for ``manual_grad.Linear / ReLU / MSELoss``
and get the same numbers, with every gradient computed by a formula you can read in
:mod:`manual_grad.functions`.
"""

from manual_grad import functional, functions, reference
from manual_grad.modules import Linear, MSELoss, ReLU
from manual_grad.per_sample import per_sample_grads

__all__ = [
    "Linear",
    "ReLU",
    "MSELoss",
    "functional",
    "functions",
    "per_sample_grads",
    "reference",
]
__version__ = "0.1.0"
