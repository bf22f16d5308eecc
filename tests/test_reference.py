"""The seed's teaching API (manual_grad.reference) against autograd."""

import pytest
import torch

from manual_grad import reference as R

LIN_GRADS = {"loop": R.lin_grad_loop, "semi": R.lin_grad_semi, "vectorized": R.lin_grad}


def leaves(N, D, M, dtype=torch.float64):
    X = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(D, M, dtype=dtype, requires_grad=True)
    b = torch.randn(M, dtype=dtype, requires_grad=True)
    return X, w, b


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("variant", LIN_GRADS.values(), ids=LIN_GRADS.keys())
def test_every_lin_grad_variant_equals_autograd(variant, M):
    X, w, b = leaves(9, 5, M)
    Z = R.lin(X, w, b)
    G = torch.randn(9, M, dtype=torch.float64)  # any upstream gradient, not only MSE's
    ref = torch.autograd.grad(Z, (X, w, b), G)
    Zd = Z.detach()
    Zd.g = G
    variant(X.detach(), Zd, w.detach(), b.detach())
    # the .g attributes land on the tensors passed in
    Xd, wd, bd = X.detach(), w.detach(), b.detach()
    variant(Xd, Zd, wd, bd)
    torch.testing.assert_close((Xd.g, wd.g, bd.g), ref)
    assert Xd.g.shape == X.shape and wd.g.shape == w.shape and bd.g.shape == b.shape


@pytest.mark.parametrize("variant", LIN_GRADS.values(), ids=LIN_GRADS.keys())
def test_lin_grad_variants_handle_an_empty_batch(variant):
    X, w, b = (t.detach() for t in leaves(0, 4, 2))
    Z = R.lin(X, w, b)
    Z.g = torch.zeros_like(Z)
    variant(X, Z, w, b)
    assert X.g.shape == (0, 4) and torch.equal(w.g, torch.zeros(4, 2, dtype=w.dtype))
    assert torch.equal(b.g, torch.zeros(2, dtype=b.dtype))


@pytest.mark.parametrize(("M", "Y_shape"), [(1, "(N,)"), (1, "(N, M)"), (4, "(N, M)")])
def test_forward_and_backward_reproduces_autograd(M, Y_shape):
    N, D = 12, 6
    X, w, b = leaves(N, D, M)
    Y = torch.randn(N if Y_shape == "(N,)" else (N, M), dtype=torch.float64)
    ref_loss = torch.nn.functional.mse_loss(
        torch.relu(X @ w + b), Y.view(N, -1).expand(N, M) if Y_shape == "(N,)" else Y
    )
    ref = torch.autograd.grad(ref_loss, (X, w, b))
    Xd, wd, bd = X.detach(), w.detach(), b.detach()
    loss = R.forward_and_backward(Xd, Y, wd, bd)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close((Xd.g, wd.g, bd.g), ref)


def test_mse_grad_and_relu_grad_are_the_chain_rule_steps():
    Z = torch.tensor([[-1.0], [0.0], [2.0]], dtype=torch.float64, requires_grad=True)
    Y = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    # the oracle is torch.relu, whose gradient at 0 is 0 in every torch version
    # (clamp_min's was 1 there before torch 2.14)
    U = torch.relu(Z)
    C = torch.nn.functional.mse_loss(U, Y.unsqueeze(1))
    (dU,) = torch.autograd.grad(C, U, retain_graph=True)
    (dZ,) = torch.autograd.grad(C, Z)
    Zd = Z.detach()
    Ud = R.relu(Zd)
    torch.testing.assert_close(R.mse(Ud, Y), C.detach())
    R.mse_grad(Ud, Y)
    torch.testing.assert_close(Ud.g, dU)  # 2 (U - Y) / N, shape (N, 1)
    R.relu_grad(Zd, Ud)
    torch.testing.assert_close(Zd.g, dZ)
    assert Zd.g[1, 0] == 0  # the gradient at exactly 0


def test_reference_mse_refuses_a_target_that_would_broadcast():
    with pytest.raises(ValueError, match=r"target shape \(5,\) does not fit output shape \(5, 3\)"):
        R.mse(torch.randn(5, 3), torch.randn(5))
