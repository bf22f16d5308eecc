"""The autograd Functions: forward and a hand-derived backward, one family per file."""

from manual_grad.functions.activations import (
    GELUFunction,
    HardsigmoidFunction,
    HardswishFunction,
    HardtanhFunction,
    LeakyReLUFunction,
    LogSoftmaxFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftmaxFunction,
    TanhFunction,
)
from manual_grad.functions.attention import (
    MatmulFunction,
    RepeatHeadsFunction,
    ScaledDotProductAttentionFunction,
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
from manual_grad.functions.normalization import (
    BatchNormFunction,
    GroupNormFunction,
    LayerNormFunction,
    RMSNormFunction,
)
from manual_grad.functions.pooling import (
    AdaptiveAvgPool2dFunction,
    AvgPool2dFunction,
    MaxPool2dFunction,
)
from manual_grad.functions.regularization import DropoutFunction
from manual_grad.functions.shape import EmbeddingFunction, FlattenFunction
from manual_grad.functions.single_pass import LinearReLUMSELossFunction, MLPMSELossFunction

__all__ = [
    "AdaptiveAvgPool2dFunction",
    "AvgPool2dFunction",
    "BCEWithLogitsLossFunction",
    "BatchNormFunction",
    "Conv2dFunction",
    "CrossEntropyLossFunction",
    "DropoutFunction",
    "EmbeddingFunction",
    "FlattenFunction",
    "GELUFunction",
    "GroupNormFunction",
    "HardsigmoidFunction",
    "HardswishFunction",
    "HardtanhFunction",
    "HuberLossFunction",
    "L1LossFunction",
    "LayerNormFunction",
    "LeakyReLUFunction",
    "LinearFunction",
    "LinearReLUFunction",
    "LinearReLUMSELossFunction",
    "LogSoftmaxFunction",
    "MSELossFunction",
    "MatmulFunction",
    "MaxPool2dFunction",
    "MLPFunction",
    "MLPMSELossFunction",
    "RMSNormFunction",
    "ReLUFunction",
    "RepeatHeadsFunction",
    "ScaledDotProductAttentionFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftmaxFunction",
    "TanhFunction",
]
