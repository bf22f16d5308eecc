"""The fused blocks (FusedLinearReLU, FusedMLP): one Function for several layers, the same
numbers as the torch.nn layers they replace."""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
from manual_grad import functional as MF
from manual_grad.functions import LinearReLUFunction, MLPFunction

D = torch.float64
SHAPES = {"1d": (4,), "2d": (5, 4), "3d": (2, 3, 4), "empty": (0, 4)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_functions_gradcheck_and_gradgradcheck(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    W1, W2 = torch.randn(6, 4, dtype=D, requires_grad=True), torch.randn(3, 6, dtype=D,
                                                                         requires_grad=True)
    b1 = torch.randn(6, dtype=D, requires_grad=True) if bias else None
    b2 = torch.randn(3, dtype=D, requires_grad=True) if bias else None

    def mlp(*a):
        return MLPFunction.apply(*a)[0]

    assert gradcheck(mlp, (x, W1, b1, W2, b2)) and gradgradcheck(mlp, (x, W1, b1, W2, b2))
    assert gradcheck(LinearReLUFunction.apply, (x, W1, b1))
    assert gradgradcheck(LinearReLUFunction.apply, (x, W1, b1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", ["FusedMLP", "FusedLinearReLU"])
def test_fused_blocks_match_the_torch_nn_layers_they_replace(fused, dtype):
    torch.manual_seed(1)
    if fused == "FusedMLP":
        ours = manual_grad.FusedMLP(6, 5, 2, dtype=dtype)
        torch.manual_seed(1)
        theirs = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.ReLU(),
                               nn.Linear(5, 2, dtype=dtype))
    else:
        ours = manual_grad.FusedLinearReLU(6, 5, dtype=dtype)
        torch.manual_seed(1)
        theirs = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.ReLU())
    # the same seed gives the same weights under the same state_dict keys
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    x = torch.randn(7, 6, dtype=dtype).mT.contiguous().mT  # non-contiguous
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    tol = {} if dtype == D else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ya, yb, **tol)
    g = torch.ones((), dtype=dtype).expand_as(ya)  # an expanded incoming gradient
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **tol, msg=name)


def test_fused_mlp_computes_only_requested_gradients():
    layer = manual_grad.FusedMLP(4, 3, 1, dtype=D)
    layer[0].weight.requires_grad_(False)
    layer[0].bias.requires_grad_(False)
    x = torch.randn(5, 4, dtype=D)  # the input needs no gradient either
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert len(saved) == 2  # W2 and h: neither x nor W1 is kept
    y.sum().backward()
    assert layer[0].weight.grad is None and layer[2].weight.grad is not None


def test_convert_fuse_turns_the_seed_network_into_one_block():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    fused, replaced, kept = manual_grad.convert(model, fuse=True)
    assert type(fused) is manual_grad.FusedMLP and replaced == {
        "": "Sequential(Linear, ReLU, Linear)"} and kept == {}
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), model(x))


def test_fused_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"mlp: expected input of shape \(\*, in_features=4\)"):
        MF.mlp(torch.randn(2, 5), torch.randn(3, 4), None, torch.randn(1, 3), None)
    with pytest.raises(ValueError, match=r"mlp: the second weight must have shape "
                                         r"\(out_features, 3\).*got \(1, 2\)"):
        MF.mlp(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 2), None)


def test_fused_mlp_dtype_mix_is_an_error_and_autocast_is_followed():
    layer = manual_grad.FusedMLP(4, 3, 2)
    with pytest.raises(TypeError, match=r"mlp: input is torch.float64 but weight is "
                                        r"torch.float32"):
        layer(torch.randn(5, 4, dtype=D))
    reference = nn.Sequential(*[m for m in layer])  # the same Linear objects, unfused
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = layer(x), reference(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)


def pair_mlp():
    torch.manual_seed(3)
    fused = manual_grad.FusedMLP(6, 5, 2, dtype=D)
    return fused, nn.Sequential(*[m for m in fused])  # the same parameters, unfused


def test_fused_mlp_compiles_fullgraph_and_vmaps_like_torch():
    torch._dynamo.reset()
    fused, plain = pair_mlp()
    x = torch.randn(4, 6, dtype=D)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), list(fused.parameters()))
    ref = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
    torch.testing.assert_close(y, plain(x))
    torch.testing.assert_close(grads, ref)
    stacked = torch.randn(3, 4, 6, dtype=D)
    torch.testing.assert_close(torch.func.vmap(fused)(stacked), torch.func.vmap(plain)(stacked))
    torch.testing.assert_close(torch.func.jacrev(fused)(x[0]), torch.func.jacrev(plain)(x[0]))


def test_fused_mlp_per_sample_grads_and_gradient_penalty_match_torch():
    fused, plain = pair_mlp()
    x, y = torch.randn(5, 6, dtype=D), torch.randn(5, 2, dtype=D)
    loss_fn = manual_grad.MSELoss()
    a = manual_grad.per_sample_grads(fused, loss_fn, x, y)
    b = manual_grad.per_sample_grads(plain, nn.MSELoss(), x, y)
    torch.testing.assert_close(a, b)
    totals = []
    for model in (fused, plain):
        xi = x.clone().requires_grad_()
        loss = loss_fn(model(xi), y)
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        totals.append(torch.autograd.grad(loss + gx.square().sum(), list(model.parameters())))
    torch.testing.assert_close(totals[0], totals[1])
