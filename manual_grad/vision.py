"""Counterparts of torchvision's own layers, for convert(): imported only when torchvision
already is (a model built from its layers has imported it), so manual_grad does not pay
torchvision's import time.

- ``LayerNorm2d`` (ConvNeXt's): LayerNorm over the channels of an (N, C, H, W) image,
  LayerNormFunction's backward on the image seen channels-last (permuted views).
- ``StochasticDepth`` (EfficientNet's, ConvNeXt's, Swin's): a dropout of whole samples,
  DropoutFunction's backward with the mask shared along each sample.
"""

from torch import Tensor
from torchvision.models.convnext import LayerNorm2d as _TorchvisionLayerNorm2d
from torchvision.ops import StochasticDepth as _TorchvisionStochasticDepth

from manual_grad import functional as F


class LayerNorm2d(_TorchvisionLayerNorm2d):
    """torchvision's ConvNeXt LayerNorm2d with the backward of ``LayerNormFunction``."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                         self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class StochasticDepth(_TorchvisionStochasticDepth):
    """torchvision's StochasticDepth with the backward of ``DropoutFunction``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.stochastic_depth(input, self.p, self.mode, self.training)


COUNTERPARTS = {cls.__bases__[-1]: cls for cls in (LayerNorm2d, StochasticDepth)}
