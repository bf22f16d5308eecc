"""linear_relu_mse_loss: the seed's computation with its gradients summed in one pass.
Oracles: gradcheck/gradgradcheck in float64, and torch.nn's autograd on the same inputs."""

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

from manual_grad import functional as MF
from manual_grad.functions import single_pass


def make(n, d_in, d_out, dtype=torch.float64, bias=True, seed=0, grad_y=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(d_out, generator=g, dtype=dtype, requires_grad=True) if bias else None
    y = torch.randn(n, d_out, generator=g, dtype=dtype, requires_grad=grad_y)
    return x, W, b, y


def torch_loss(x, W, b, y, reduction="mean"):
    return TF.mse_loss(torch.relu(TF.linear(x, W, b)), y, reduction=reduction)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every test crosses chunk boundaries."""
    monkeypatch.setattr(single_pass, "CHUNK_BYTES", 3 * 5 * 8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck(small_chunks, reduction, bias):
    args = [t for t in make(7, 5, 3, bias=bias, grad_y=True) if t is not None]

    def f(x, W, *rest):
        b, y = (rest if bias else (None, *rest))
        return MF.linear_relu_mse_loss(x, W, b, y, reduction)

    assert gradcheck(f, tuple(args))
    assert gradgradcheck(f, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "d_in", "d_out"), [(7, 5, 3), (64, 784, 1), (1, 4, 2), (0, 3, 2)])
def test_matches_torch_nn(small_chunks, dtype, n, d_in, d_out):
    ours, theirs = make(n, d_in, d_out, dtype, grad_y=True), make(n, d_in, d_out, dtype,
                                                                  grad_y=True)
    loss = MF.linear_relu_mse_loss(*ours)
    expected = torch_loss(*theirs)
    # float32: the gradients are summed chunk by chunk (here one row at a time, the worst
    # order: up to 64 sequential additions) where torch sums inside one matmul
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, expected, equal_nan=True, **tol)
    if n == 0:
        return
    for a, b in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(expected, theirs),
                    strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_the_seeds_layout_and_only_the_gradients_asked_for():
    # w of shape (1, in), target (n,): the derivation's shapes; input needs no gradient
    x, W, b, y = make(300, 784, 1, torch.float32)
    x = x.detach()
    loss = MF.linear_relu_mse_loss(x, W, b, y.squeeze(1))
    loss.backward()
    W2, b2 = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch_loss(x, W2, b2, y).backward()
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)
    assert x.grad is None


def test_gradient_scales_with_the_incoming_gradient(small_chunks):
    x, W, b, y = make(9, 4, 2)
    (gW,) = torch.autograd.grad(MF.linear_relu_mse_loss(x, W, b, y) * 3.0, W)
    (expected,) = torch.autograd.grad(torch_loss(x, W, b, y) * 3.0, W)
    torch.testing.assert_close(gW, expected)


def test_no_grad_computes_only_the_loss():
    x, W, b, y = make(6, 4, 2)
    with torch.no_grad():
        loss = MF.linear_relu_mse_loss(x, W, b, y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, torch_loss(x, W, b, y).detach())


def test_vmap_and_compile_take_the_recomputing_backward():
    x, W, b, y = make(6, 4, 2)
    per_sample = torch.func.vmap(torch.func.grad(
        lambda W, xi, yi: MF.linear_relu_mse_loss(xi[None], W, b.detach(), yi[None])),
        in_dims=(None, 0, 0))(W.detach(), x.detach(), y)
    expected = torch.stack([torch.autograd.grad(torch_loss(x[i:i + 1].detach(), W, b, y[i:i + 1]),
                                                W)[0] for i in range(6)])
    torch.testing.assert_close(per_sample, expected)
    compiled = torch.compile(MF.linear_relu_mse_loss, backend="aot_eager", fullgraph=True)
    (gW,) = torch.autograd.grad(compiled(x, W, b, y), W)
    torch.testing.assert_close(gW, torch.autograd.grad(torch_loss(x, W, b, y), W)[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(4, 3), torch.randn(2, 3), None, torch.randn(4, 3)), r"target shape"),
        ((torch.randn(2, 4, 3), torch.randn(2, 3), None, torch.randn(2, 4, 2)), r"2-D"),
        ((torch.randn(4, 3), torch.randn(2, 3), None, torch.randn(4, 2, dtype=torch.float64)),
         r"target\.to\(input\.dtype\)"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MF.linear_relu_mse_loss(*args)


def test_none_reduction_is_refused_with_the_alternative():
    x, W, b, y = make(3, 2, 1)
    with pytest.raises(ValueError, match="reduction='none'"):
        MF.linear_relu_mse_loss(x, W, b, y, "none")


def test_autocast_runs_the_separate_layers_like_torch():
    x, W, b, y = make(8, 6, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = MF.linear_relu_mse_loss(x, W, b, y)
        theirs = torch_loss(x, W, b, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


def test_non_contiguous_input_gets_a_gradient_of_its_own_layout(small_chunks):
    x = torch.randn(5, 9, dtype=torch.float64).t().requires_grad_()  # (9, 5), strided
    _, W, b, y = make(9, 5, 3)
    (gx,) = torch.autograd.grad(MF.linear_relu_mse_loss(x, W, b, y), x)
    x2 = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch_loss(x2, W, b, y), x2)
    torch.testing.assert_close(gx, expected)
