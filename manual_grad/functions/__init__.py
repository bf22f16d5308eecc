"""The autograd Functions: forward and a hand-derived backward, one family per file."""

from manual_grad.functions.activations import (
    GELUFunction,
    LeakyReLUFunction,
    LogSoftmaxFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftmaxFunction,
    TanhFunction,
)
from manual_grad.functions.conv import Conv2dFunction
from manual_grad.functions.fused import LinearReLUFunction, MLPFunction
from manual_grad.functions.linear import LinearFunction
from manual_grad.functions.losses import (
    BCEWithLogitsLossFunction,
    CrossEntropyLossFunction,
    HuberLossFunction,
    L1LossFunction,
    MSELossFunction,
)
from manual_grad.functions.normalization import BatchNormFunction, LayerNormFunction
from manual_grad.functions.pooling import AvgPool2dFunction, MaxPool2dFunction
from manual_grad.functions.regularization import DropoutFunction
from manual_grad.functions.shape import EmbeddingFunction, FlattenFunction
from manual_grad.functions.single_pass import LinearReLUMSELossFunction, MLPMSELossFunction

__all__ = [
    "AvgPool2dFunction",
    "BCEWithLogitsLossFunction",
    "BatchNormFunction",
    "Conv2dFunction",
    "CrossEntropyLossFunction",
    "DropoutFunction",
    "EmbeddingFunction",
    "FlattenFunction",
    "GELUFunction",
    "HuberLossFunction",
    "L1LossFunction",
    "LayerNormFunction",
    "LeakyReLUFunction",
    "LinearFunction",
    "LinearReLUFunction",
    "LinearReLUMSELossFunction",
    "LogSoftmaxFunction",
    "MSELossFunction",
    "MaxPool2dFunction",
    "MLPFunction",
    "MLPMSELossFunction",
    "ReLUFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftmaxFunction",
    "TanhFunction",
]
