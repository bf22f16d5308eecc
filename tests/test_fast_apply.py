"""fast_apply: eager calls take the combined-style twin, transforms take torch's own path,
and both give the same values and gradients (they run the same forward and backward)."""

import pytest
import torch

import manual_grad.functional as F
from manual_grad.functions import (
    LinearFunction,
    LinearReLUFunction,
    MLPFunction,
    MSELossFunction,
    ReLUFunction,
)
from manual_grad.functions._fast_apply import _torch_apply


def torch_path(cls, *args):
    """The class's apply as torch defines it (argument binding included)."""
    return _torch_apply.__get__(None, cls)(*args)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return x, W1, b1, W2, b2, y


CALLS = {
    "linear": lambda apply, x, W1, b1, W2, b2, y: apply(LinearFunction, x, W1, b1),
    "relu": lambda apply, x, W1, b1, W2, b2, y: apply(ReLUFunction, x - 0.2, False),
    "mlp": lambda apply, x, W1, b1, W2, b2, y: apply(MLPFunction, x, W1, b1, W2, b2)[0],
    "mse": lambda apply, x, W1, b1, W2, b2, y: apply(
        MSELossFunction, apply(LinearFunction, apply(ReLUFunction, apply(
            LinearFunction, x, W1, b1), False), W2, b2), y, "mean"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_eager_twin_and_torch_path_agree(name):
    fast_in, slow_in = inputs(), inputs()
    fast = CALLS[name](lambda cls, *a: cls.apply(*a), *fast_in)
    slow = CALLS[name](torch_path, *slow_in)
    assert type(fast.grad_fn).__name__ == type(slow.grad_fn).__name__
    assert type(fast.grad_fn)._forward_cls is not type(slow.grad_fn)._forward_cls
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    leaves = [t for t in fast_in if t.requires_grad]
    grads_fast = torch.autograd.grad(fast.sum(), leaves, allow_unused=True,
                                     materialize_grads=True)
    grads_slow = torch.autograd.grad(slow.sum(), [t for t in slow_in if t.requires_grad],
                                     allow_unused=True, materialize_grads=True)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_call_uses_the_twin_and_transforms_use_torchs_path():
    x, W1, b1, *_ = inputs()
    y = LinearFunction.apply(x, W1, b1)
    assert type(y.grad_fn)._forward_cls is LinearFunction._eager_twin
    seen = []

    def f(w):
        out = LinearFunction.apply(x.detach(), w, b1.detach())
        seen.append(torch._C._are_functorch_transforms_active())
        return out.sum()

    grad = torch.func.grad(f)(W1.detach())
    assert seen == [True]
    torch.testing.assert_close(grad, x.detach().sum(0).expand_as(W1))


def test_defaults_are_filled_in_and_keywords_work():
    u = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, dtype=torch.float64)
    mean = MSELossFunction.apply(u, y)  # reduction left to forward's default
    assert type(mean.grad_fn)._forward_cls is MSELossFunction._eager_twin
    torch.testing.assert_close(mean, torch.nn.functional.mse_loss(u, y))
    total = MSELossFunction.apply(u, y, reduction="sum")  # keywords, bound to positions
    torch.testing.assert_close(total, torch.nn.functional.mse_loss(u, y, reduction="sum"))
    (gu,) = torch.autograd.grad(total, u)
    torch.testing.assert_close(gu, 2 * (u - y))


def test_wrong_argument_count_is_torchs_type_error():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError):
        LinearFunction.apply(x)
    with pytest.raises(TypeError):
        ReLUFunction.apply(x, False, 1, 2)


def test_gradcheck_through_the_twin_and_through_torchs_path():
    x, W1, b1, W2, b2, _ = inputs()
    args = (x, W1, b1, W2, b2)
    assert torch.autograd.gradcheck(lambda *a: MLPFunction.apply(*a)[0], args)
    assert torch.autograd.gradgradcheck(lambda *a: MLPFunction.apply(*a)[0], args)
    assert torch.autograd.gradcheck(lambda *a: torch_path(MLPFunction, *a)[0], args)
    assert torch.autograd.gradgradcheck(lambda *a: torch_path(MLPFunction, *a)[0], args)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_through_the_twin(use_reentrant):
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    import manual_grad

    ours = nn.Sequential(manual_grad.Linear(6, 5), manual_grad.ReLU(), manual_grad.Linear(5, 1))
    theirs = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    checkpoint(ours, xa, use_reentrant=use_reentrant).sum().backward()
    theirs(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_subclass_goes_through_torchs_path_as_itself():
    class Sub(LinearFunction):  # a user's subclass (it might override any method)
        pass

    x, W1, b1, *_ = inputs()
    y = Sub.apply(x, W1, b1)
    assert type(y.grad_fn)._forward_cls is Sub
    (gW,) = torch.autograd.grad(y.sum(), W1)
    torch.testing.assert_close(gW, x.detach().sum(0).expand_as(W1))



FUNCTIONAL_CALLS = {  # functional's entry points that call the twin themselves
    "linear": (LinearFunction, lambda x, W1, b1, W2, b2, y: F.linear(x, W1, b1)),
    "linear_relu": (LinearReLUFunction, lambda x, W1, b1, W2, b2, y:
                    F.linear_relu(x, W1, b1)),
    "mlp": (MLPFunction, lambda x, W1, b1, W2, b2, y: F.mlp(x, W1, b1, W2, b2)),
    "relu": (ReLUFunction, lambda x, W1, b1, W2, b2, y: F.relu(x - 0.2)),
    "mse_loss": (MSELossFunction, lambda x, W1, b1, W2, b2, y:
                 F.mse_loss(F.mlp(x, W1, b1, W2, b2), y)),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_CALLS))
def test_functional_calls_the_twin_eagerly_and_torchs_path_under_vmap(name):
    cls, call = FUNCTIONAL_CALLS[name]
    args = inputs()
    out = call(*args)
    assert type(out.grad_fn)._forward_cls is cls._eager_twin
    # under vmap the same call must take torch's path: the twin cannot run there
    x, *rest = (t.detach() for t in args)
    batched = torch.func.vmap(lambda xs: call(xs, *rest))(x.unsqueeze(0))
    torch.testing.assert_close(batched[0], out.detach())
