"""The LightningModules train.py can run: the seed's regressor, an MLP classifier, a CNN.

Each is a textbook LightningModule: ``forward``, a ``training_step`` that returns the loss,
``validation_step`` / ``test_step``, and ``configure_optimizers`` returning the optimiser.
The layers come from manual_grad (``impl: manual``) or are the identical torch.nn layers
(``impl: native``); both consume the random stream identically, so the same seed gives
the same initial weights and the two runs can be compared step by step. ``impl: fused``
runs the MLPs' linear -> ReLU -> linear as one FusedMLP Function (same weights and
state_dict keys), and the regressor's training steps take the block and its MSE loss as
one (``FusedMLP.mse_loss``); the CNN has no fused block and runs as ``manual``.

Three mixins carry what a textbook module leaves out, each in its own file:
``EpochMeans`` (epoch_means.py: the epoch metrics, cheaply and exactly under DDP),
``RestoresAsConfigured`` (checkpoint_io.py: a resumed run gets this run's precision and
optimiser settings) and ``GroupedSteps`` (grouped.py: several optimiser steps per
Lightning step, and their CUDA-graph replay).
"""

import math
from collections.abc import Callable, Iterable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

import manual_grad
from manual_grad.training.checkpoint_io import RestoresAsConfigured
from manual_grad.training.epoch_means import EpochMeans
from manual_grad.training.grouped import GroupedSteps

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
Impl = Literal["manual", "native", "fused"]


def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD, the seed's optimiser; lr 0.01 suits standardised MNIST at batch 64."""
    return torch.optim.SGD(params, lr=0.01)


def mlp(lib, impl: Impl, d_in: int, hidden: int, d_out: int) -> nn.Module:
    """linear -> ReLU -> linear from ``lib`` (manual_grad or torch.nn), or fused in one."""
    if impl == "fused":
        return manual_grad.FusedMLP(d_in, hidden, d_out)
    return nn.Sequential(lib.Linear(d_in, hidden), lib.ReLU(), lib.Linear(hidden, d_out))


class DigitModel(RestoresAsConfigured, EpochMeans, L.LightningModule):
    """What every model here shares: the steps, the metrics and the optimiser.

    Subclasses set ``self.net`` and ``self.loss_fn`` and say whether they regress the
    digit's value (metric ``mse``, the seed's task) or classify it (metric ``loss``).
    """

    metric = "loss"

    def __init__(self, impl: Impl, optimizer: OptimizerFactory) -> None:
        super().__init__()
        self.impl = impl
        self.lib = nn if impl == "native" else manual_grad
        self.optimizer_factory = optimizer

    def target(self, y: Tensor) -> Tensor:
        return y

    def predict_digit(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss a training step minimises (validation and test use ``loss_fn``)."""
        return self.loss_fn(self(x), self.target(y))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.training_loss(x, y)
        # the epoch's mean over every sample: self.log(..., on_epoch=True, batch_size=n)
        self.add_to_epoch_mean("train", f"train_{self.metric}", loss.detach() * len(y), len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        out = self(x)
        n = len(y)
        self.add_to_epoch_mean(stage, f"{stage}_{self.metric}",
                               self.loss_fn(out, self.target(y)) * n, n)
        self.add_to_epoch_mean(stage, f"{stage}_acc",
                               (self.predict_digit(out) == y).sum().to(out.dtype), n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class MNISTRegressor(GroupedSteps, DigitModel):
    """Predict a digit's value from its pixels: linear -> ReLU -> linear, MSE (the seed).

    Args:
        in_features: pixels per image; train.py links it to the data (784 or 64).
        hidden: width of the hidden layer (the seed uses 50).
        impl: ``manual`` (hand-derived backward), ``native`` (torch.nn) or ``fused``
            (the whole MLP as one hand-derived Function, and in training the MLP and its
            loss as one: ``FusedMLP.mse_loss``).
        optimizer: a factory ``params -> Optimizer``; in YAML a ``class_path`` such as
            ``torch.optim.SGD`` with its ``init_args`` (lr, momentum...).
        steps_per_batch: optimiser steps per Lightning step; train.py links it to
            ``data.steps_per_batch`` (see grouped.py).
        cuda_graph: on a GPU, capture one whole optimiser step (forward, hand-derived
            backward, SGD) as a CUDA graph and replay it for the grouped steps (needs
            ``data.steps_per_batch`` > 1; see ``cuda_graph.py``). Where it cannot be
            used (CPU, mixed precision, an LR scheduler, per-step hooks) a warning says
            why and training runs as usual.
    """

    metric = "mse"

    def __init__(self, in_features: int = 784, hidden: int = 50, impl: Impl = "manual",
                 optimizer: OptimizerFactory = sgd, steps_per_batch: int = 1,
                 cuda_graph: bool = False) -> None:
        super().__init__(impl, optimizer)
        # impl, steps_per_batch and cuda_graph are not saved: they change no parameter,
        # so a checkpoint of either implementation loads into the other (and the command
        # line, not the checkpoint, decides how it runs)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch",
                                          "cuda_graph"])
        self.net = mlp(self.lib, impl, in_features, hidden, 1)
        self.loss_fn = self.lib.MSELoss()
        self.group_steps(steps_per_batch, cuda_graph)
        self.reads_rows = impl == "fused"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (N, 1) -> (N,), the shape of the targets

    def predict_digit(self, out: Tensor) -> Tensor:
        return out.round()  # a regression on the digit's value is right when it rounds to it

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.impl == "fused":  # the block and its loss as one Function: the same
            # numbers, a step's gradients from one call forward and one backward
            return self.net.mse_loss(x, self.target(y))
        return super().training_loss(x, y)

    def rows_loss(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        if self.impl == "fused":  # the batch's rows read from the split as they are summed
            return self.net.mse_loss(x, self.target(y), rows=rows)
        return super().rows_loss(x, y, rows)


class MNISTClassifier(GroupedSteps, DigitModel):
    """Classify a digit: linear -> ReLU -> linear to 10 logits, cross-entropy.

    Args: as :class:`MNISTRegressor`, plus ``label_smoothing`` of the loss.
    """

    def __init__(self, in_features: int = 784, hidden: int = 100, impl: Impl = "manual",
                 label_smoothing: float = 0.0, optimizer: OptimizerFactory = sgd,
                 steps_per_batch: int = 1) -> None:
        super().__init__(impl, optimizer)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch"])
        self.net = mlp(self.lib, impl, in_features, hidden, 10)
        self.loss_fn = self.lib.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.group_steps(steps_per_batch)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def target(self, y: Tensor) -> Tensor:
        return y.long()

    def predict_digit(self, out: Tensor) -> Tensor:
        return out.argmax(1).to(out.dtype)


class MNISTConvNet(MNISTClassifier):
    """A small CNN: two blocks of Conv2d(3x3) -> BatchNorm2d -> ReLU -> MaxPool2d(2),
    then Flatten -> Linear to 10 logits, cross-entropy. Square images of in_features
    pixels (28 x 28, or 8 x 8 offline).

    Args: as :class:`MNISTClassifier`, with ``channels`` the two blocks' widths.
    """

    def __init__(self, in_features: int = 784, channels: tuple[int, int] = (8, 16),
                 impl: Impl = "manual", label_smoothing: float = 0.0,
                 optimizer: OptimizerFactory = sgd, steps_per_batch: int = 1) -> None:
        DigitModel.__init__(self, impl, optimizer)
        self.save_hyperparameters(ignore=["optimizer", "impl", "steps_per_batch"])
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(f"MNISTConvNet needs square images, got in_features={in_features}")
        self.side = side
        lib, (c1, c2) = self.lib, channels
        self.net = nn.Sequential(
            lib.Conv2d(1, c1, 3, padding=1), lib.BatchNorm2d(c1), lib.ReLU(), lib.MaxPool2d(2),
            lib.Conv2d(c1, c2, 3, padding=1), lib.BatchNorm2d(c2), lib.ReLU(), lib.MaxPool2d(2),
            lib.Flatten(), lib.Linear(c2 * (side // 4) ** 2, 10))
        self.loss_fn = lib.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.group_steps(steps_per_batch)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 1, self.side, self.side))
