"""The autograd Functions: forward and a hand-derived backward, one family per file."""

from manual_grad.functions.activations import ReLUFunction
from manual_grad.functions.linear import LinearFunction
from manual_grad.functions.losses import MSELossFunction

__all__ = ["LinearFunction", "ReLUFunction", "MSELossFunction"]
