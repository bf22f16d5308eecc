"""torch.func helpers for a model's loss: per-sample gradients (reverse mode), and the
forward-mode products users reach for: a Jacobian-vector product of the loss, and a
Hessian-vector product as the forward-mode derivative of its gradient."""

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap


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


def _loss_of_params(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    inputs: Tensor, targets: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, (params, buffers), (inputs,)), targets)

    return loss


def loss_jvp(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
             targets: Tensor, tangents: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(loss, dloss)``: the loss of the batch, and its derivative along the parameter
    direction ``tangents`` ({name: tensor shaped like the parameter}), by forward mode
    (``torch.func.jvp``): one pass, each layer pushing the tangent forward by its jvp."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return jvp(_loss_of_params(model, loss_fn, inputs, targets), (params,), (tangents,))


def loss_hvp(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
             targets: Tensor, vector: dict[str, Tensor]) -> dict[str, Tensor]:
    """H v for H the Hessian of the batch's loss in the parameters, ``vector`` shaped like
    them: forward over reverse, the jvp of the gradient along v (the gradient's backward
    passes pushed forward by forward mode), without forming H."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return jvp(grad(_loss_of_params(model, loss_fn, inputs, targets)), (params,),
               (vector,))[1]


__all__ = ["loss_hvp", "loss_jvp", "per_sample_grads"]
