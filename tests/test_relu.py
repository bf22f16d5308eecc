"""ReLUFunction, functional.relu and ReLU against gradcheck and torch.nn."""

import pytest
import torch
from conftest import tol
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
from manual_grad import functional as MF

SHAPES = {"0d": (), "1d": (7,), "2d": (4, 5), "3d": (2, 3, 4), "empty": (0, 4)}


def away_from_zero(shape):
    # finite differences straddle the kink at 0 if an entry is too close to it
    x = torch.randn(shape, dtype=torch.float64)
    return (x + 0.1 * x.sign()).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_relu_gradcheck_and_gradgradcheck(shape):
    x = away_from_zero(shape)
    assert gradcheck(MF.relu, (x,))
    assert gradgradcheck(MF.relu, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_relu_matches_torch(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = manual_grad.ReLU()(x1), torch.nn.ReLU()(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype))


def test_relu_gradient_at_zero_nan_and_inf_is_torchs():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 2.0, -2.0])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = MF.relu(x1), torch.relu(x2)
    torch.testing.assert_close(y1, y2, equal_nan=True)
    g = torch.arange(1.0, 8.0)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, equal_nan=True)
    assert x1.grad[0] == 0 and x1.grad[1] == 0  # the subgradient chosen at exactly 0


def test_relu_non_finite_incoming_gradient_at_zero_is_the_documented_difference():
    # The float mask multiplies: 0 * inf is NaN where torch's select gives 0. Everywhere
    # else (u > 0, or g finite) the result is torch's, bit for bit.
    x = torch.tensor([0.0, -1.0, 2.0, 3.0], requires_grad=True)
    g = torch.tensor([float("inf"), 5.0, float("inf"), float("nan")])
    (ours,) = torch.autograd.grad(MF.relu(x), x, g)
    (theirs,) = torch.autograd.grad(torch.relu(x), x, g)
    assert ours[0].isnan() and theirs[0] == 0
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=0, atol=0, equal_nan=True)


def test_relu_plain_and_differentiable_backwards_agree_with_torch():
    # A plain backward writes (u != 0) * g into one new tensor; one that builds a graph
    # (create_graph, and likewise vmap and compile) multiplies out of place. Both must
    # give torch's values, including NaN units and non-finite g at live units.
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([0.0, -0.0, nan, inf, -inf, 2.0, -2.0, 1e-30], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, inf, 5.0, -inf, 7.0, nan])
    (plain,) = torch.autograd.grad(MF.relu(x), x, g)
    (graphed,) = torch.autograd.grad(MF.relu(x), x, g, create_graph=True)
    (theirs,) = torch.autograd.grad(torch.relu(x), x, g)
    torch.testing.assert_close(plain, theirs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(graphed.detach(), theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "make_grad",
    [lambda y: torch.ones(()).expand_as(y), lambda y: torch.randn(y.shape[::-1]).t()],
    ids=["expanded", "transposed"],
)
def test_relu_accepts_non_contiguous_incoming_gradient(make_grad):
    x = torch.randn(4, 6, requires_grad=True)
    y = MF.relu(x)
    g = make_grad(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, torch.where(x > 0, g, 0.0))


def test_relu_no_gradient_requested_saves_nothing():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MF.relu(torch.randn(3))
    assert y.grad_fn is None and saved == []


def test_relu_inplace_overwrites_input_and_keeps_gradient():
    a = torch.randn(5, 4, requires_grad=True)
    ref_a = a.detach().clone().requires_grad_()
    z = a * 2  # a non-leaf, as in a real network
    out = manual_grad.ReLU(inplace=True)(z)
    assert out.data_ptr() == z.data_ptr() and torch.equal(z, out)
    ref = torch.nn.ReLU(inplace=True)(ref_a * 2)
    torch.testing.assert_close(out, ref)
    g = torch.randn(5, 4)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, ref_a.grad)
    assert repr(manual_grad.ReLU(inplace=True)) == "ReLU(inplace=True)"


def test_relu_inplace_on_a_leaf_is_refused_like_torch():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        MF.relu(x, inplace=True)


def test_relu_inplace_after_an_op_that_needs_its_input_is_refused_like_torch():
    # sigmoid saves its output; overwriting that output breaks its backward
    x = torch.randn(4, requires_grad=True)
    s = torch.sigmoid(x)
    y = MF.relu(s, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
