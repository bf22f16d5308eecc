"""Drop-in nn.Modules whose forward runs a hand-derived Function.

Each class subclasses its torch.nn counterpart, so it has the very same
constructor signature, parameters, default initialisation (``reset_parameters``),
``extra_repr`` and state_dict keys: a state_dict saved from one loads into the
other, both ways, and ``isinstance(layer, torch.nn.Linear)`` still holds. Only
``forward`` differs: it goes through :mod:`manual_grad.functional`, which checks
the arguments and calls the Function whose backward was derived by hand.
"""

from torch import Tensor, nn

from manual_grad import functional as F


class Linear(nn.Linear):
    """``torch.nn.Linear`` with the hand-derived backward of :class:`LinearFunction`.

    Linear(in_features, out_features, bias=True, device=None, dtype=None);
    input (*, in_features) -> output (*, out_features).
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class ReLU(nn.ReLU):
    """``torch.nn.ReLU`` with the hand-derived backward of :class:`ReLUFunction`.

    ReLU(inplace=False). ``inplace=True`` overwrites the input with the result,
    exactly as torch does; this is safe for the hand-written backward because it
    reads only the output's sign. As in torch, autograd refuses it when the
    overwritten input is needed by an earlier layer's backward.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class MSELoss(nn.MSELoss):
    """``torch.nn.MSELoss`` with the hand-derived backward of :class:`MSELossFunction`.

    MSELoss(size_average=None, reduce=None, reduction='mean'). Shapes that would
    broadcast the loss beyond the input's shape raise an error (torch only warns).
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)
