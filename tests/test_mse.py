"""MSELossFunction, functional.mse_loss and MSELoss against gradcheck and torch.nn."""

import pytest
import torch
from conftest import tol
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
from manual_grad import functional as MF

REDUCTIONS = ["mean", "sum", "none"]
SHAPES = {"1d": (7,), "2d": (4, 3), "3d": (2, 3, 4), "empty": (0, 3)}


@pytest.mark.parametrize("target_grad", [False, True], ids=["target-fixed", "target-grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_mse_gradcheck_and_gradgradcheck(shape, reduction, target_grad):
    u = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=target_grad)

    def f(u, y):
        return MF.mse_loss(u, y, reduction=reduction)

    assert gradcheck(f, (u, y))
    assert gradgradcheck(f, (u, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_mse_matches_torch(shape, reduction, dtype):
    u, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    u1, y1 = u.clone().requires_grad_(), y.clone().requires_grad_()
    u2, y2 = u.clone().requires_grad_(), y.clone().requires_grad_()
    c1 = manual_grad.MSELoss(reduction=reduction)(u1, y1)
    c2 = torch.nn.MSELoss(reduction=reduction)(u2, y2)
    torch.testing.assert_close(c1, c2, **tol(dtype), equal_nan=True)  # empty mean is nan
    g = torch.randn_like(c1)
    c1.backward(g)
    c2.backward(g)
    torch.testing.assert_close(u1.grad, u2.grad, **tol(dtype))
    torch.testing.assert_close(y1.grad, y2.grad, **tol(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_target_broadcast_up_to_input_shape_matches_torch(reduction):
    u = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for y in (torch.randn(3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)):
        y = y.requires_grad_()
        assert gradcheck(lambda u, y: MF.mse_loss(u, y, reduction=reduction), (u, y))
        ours = torch.autograd.grad(MF.mse_loss(u, y, reduction=reduction).sum(), (u, y))
        with pytest.warns(UserWarning):  # torch warns, and computes the same thing
            ref = torch.nn.functional.mse_loss(u, y, reduction=reduction)
        torch.testing.assert_close(ours, torch.autograd.grad(ref.sum(), (u, y)))


def test_mse_expanded_incoming_gradient_for_none_reduction():
    u = torch.randn(5, 2, requires_grad=True)
    y = torch.randn(5, 2)
    c = MF.mse_loss(u, y, reduction="none")
    (gu,) = torch.autograd.grad(c, u, torch.ones(()).expand(5, 2))
    torch.testing.assert_close(gu, 2 * (u - y))


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True), (False, False)])
def test_mse_gradient_per_requested_input(needs):
    u = torch.randn(6, requires_grad=needs[0])
    y = torch.randn(6, requires_grad=needs[1])
    c = MF.mse_loss(u, y)
    if not any(needs):
        assert c.grad_fn is None
        return
    wanted = [t for t, flag in zip((u, y), needs, strict=True) if flag]
    grads = torch.autograd.grad(c, wanted)
    torch.testing.assert_close(grads, torch.autograd.grad(((u - y) ** 2).mean(), wanted))


def test_mse_refuses_the_n1_against_n_trap():
    u, y = torch.randn(64, 1), torch.randn(64)
    with pytest.raises(ValueError) as err:
        manual_grad.MSELoss()(u, y)
    msg = str(err.value)
    assert "(64, 1)" in msg and "(64,)" in msg and "(64, 64)" in msg
    assert "input.squeeze(-1)" in msg
    with pytest.raises(ValueError, match=r"target.squeeze\(-1\)"):
        MF.mse_loss(y, u)


def test_mse_refuses_shapes_that_do_not_broadcast_at_all():
    with pytest.raises(ValueError, match=r"input shape \(4, 3\) and target shape \(5,\)"):
        MF.mse_loss(torch.randn(4, 3), torch.randn(5))


def test_mse_dtype_mix_and_bad_reduction_are_clear_errors():
    with pytest.raises(TypeError, match=r"target is torch.int64.*target.to\(input.dtype\)"):
        MF.mse_loss(torch.randn(3), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"reduction must be one of.*'avg'"):
        MF.mse_loss(torch.randn(3), torch.randn(3), reduction="avg")


def test_mse_module_mirrors_torch_nn_mseloss():
    assert repr(manual_grad.MSELoss()) == repr(torch.nn.MSELoss()) == "MSELoss()"
    assert manual_grad.MSELoss(reduction="sum").reduction == "sum"
    with pytest.warns(UserWarning, match="size_average"):  # legacy arguments, as in torch
        assert manual_grad.MSELoss(size_average=False).reduction == "sum"
    assert manual_grad.MSELoss().state_dict() == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_plain_and_differentiable_backwards_agree_with_torch(reduction, dtype):
    # A plain backward scales u - y in place by a kept tensor; one that builds a graph
    # (create_graph, and likewise vmap and compile) multiplies out of place. Both must give
    # torch's gradients, for each reduction and for a half type (scale kept in float32).
    u = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    y = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    g = torch.rand(6, 5, dtype=dtype) if reduction == "none" else torch.tensor(3.0, dtype=dtype)
    plain = torch.autograd.grad(MF.mse_loss(u, y, reduction=reduction), (u, y), g)
    graphed = torch.autograd.grad(MF.mse_loss(u, y, reduction=reduction), (u, y), g,
                                  create_graph=True)
    theirs = torch.autograd.grad(torch.nn.functional.mse_loss(u, y, reduction=reduction),
                                 (u, y), g)
    close = tol(dtype) if dtype != torch.bfloat16 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b, c in zip(plain, graphed, theirs, strict=True):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, **close)
        torch.testing.assert_close(b.detach(), c, **close)
