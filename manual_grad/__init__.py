"""manual_grad: neural-network layers whose backward passes are derived by hand.

Swap ``torch.nn.Linear / ReLU / MSELoss`` for ``manual_grad.Linear / ReLU / MSELoss``
and get the same numbers, with every gradient computed by a formula you can read in
:mod:`manual_grad.functions`.
"""

from manual_grad import functional, functions, reference
from manual_grad.convert import Conversion, convert
from manual_grad.modules import (
    GELU,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Embedding,
    Flatten,
    FusedLinearReLU,
    FusedMLP,
    HuberLoss,
    L1Loss,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    MSELoss,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from manual_grad.per_sample import per_sample_grads

__all__ = [
    "AvgPool2d",
    "BCEWithLogitsLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Embedding",
    "Flatten",
    "FusedLinearReLU",
    "FusedMLP",
    "GELU",
    "HuberLoss",
    "L1Loss",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "MaxPool2d",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "Conversion",
    "convert",
    "functional",
    "functions",
    "per_sample_grads",
    "reference",
]
__version__ = "0.1.0"
