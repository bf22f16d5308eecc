"""Training with Lightning: the models, MNIST data, the CLI and a run report."""

from manual_grad.training.callbacks import (
    NonFiniteLossError,
    RunCheckpoint,
    RunError,
    StopOnNonFinite,
)
from manual_grad.training.checkpoint_io import CheckpointError, SafeCheckpointIO
from manual_grad.training.data import MNISTDataModule, ResidentLoader
from manual_grad.training.idx import IDXError, read_idx
from manual_grad.training.models import (
    DigitModel,
    MNISTClassifier,
    MNISTConvNet,
    MNISTRegressor,
)
from manual_grad.training.report import RunReport

__all__ = [
    "CheckpointError",
    "DigitModel",
    "IDXError",
    "MNISTClassifier",
    "MNISTConvNet",
    "MNISTDataModule",
    "MNISTRegressor",
    "NonFiniteLossError",
    "ResidentLoader",
    "RunCheckpoint",
    "RunError",
    "RunReport",
    "SafeCheckpointIO",
    "StopOnNonFinite",
    "read_idx",
]
