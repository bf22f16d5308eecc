"""Per-sample gradients with torch.func: one gradient per example, in one vectorized call."""

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                     inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """``{name: (N, *param.shape)}``: the gradient of ``loss_fn(model(x_i), y_i)`` for each i.

    ``vmap(grad(...))`` over the batch: each example goes through the model as a batch of
    one, exactly as a Python loop would send it, but in one call. Works for models made
    of manual_grad layers because their Functions define vmap rules.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_of_one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, targets)


__all__ = ["per_sample_grads"]
