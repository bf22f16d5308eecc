"""The seed's network as a LightningModule: in_features -> hidden -> ReLU -> 1, MSE."""

from collections.abc import Callable, Iterable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

import manual_grad

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD, the seed's optimiser; lr 0.01 suits standardised MNIST at batch 64."""
    return torch.optim.SGD(params, lr=0.01)


class MNISTRegressor(L.LightningModule):
    """Predict a digit's value from its pixels with linear -> ReLU -> linear and MSE.

    Args:
        in_features: pixels per image; train.py links it to the data (784 or 64).
        hidden: width of the hidden layer (the seed uses 50).
        impl: ``manual`` builds the layers from manual_grad (hand-derived
            backward), ``native`` from torch.nn. Both consume the random stream
            identically, so the same seed gives the same initial weights.
        optimizer: a factory ``params -> Optimizer``; in YAML a ``class_path``
            such as ``torch.optim.SGD`` with its ``init_args`` (lr, momentum...).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: int = 50,
        impl: Literal["manual", "native"] = "manual",
        optimizer: OptimizerFactory = sgd,
    ) -> None:
        super().__init__()
        # impl is not saved: it changes no parameter, so a checkpoint of either
        # implementation loads into the other (and the command line decides which runs)
        self.save_hyperparameters(ignore=["optimizer", "impl"])
        self.impl = impl
        lib = manual_grad if impl == "manual" else nn
        self.net = nn.Sequential(lib.Linear(in_features, hidden), lib.ReLU(),
                                 lib.Linear(hidden, 1))
        self.loss_fn = lib.MSELoss()
        self.optimizer_factory = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (N, 1) -> (N,), the shape of the targets

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_mse", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        pred = self(x)
        self.log(f"{prefix}_mse", self.loss_fn(pred, y), prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        # a regression on the digit's value is right when it rounds to the label
        acc = (pred.round() == y).to(pred.dtype).mean()
        self.log(f"{prefix}_acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
