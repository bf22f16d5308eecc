"""LinearFunction, functional.linear and Linear against gradcheck and torch.nn."""

import itertools

import pytest
import torch
from conftest import tol
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.flop_counter import FlopCounterMode

import manual_grad
from manual_grad import functional as MF
from manual_grad.functions import LinearFunction

SHAPES = {
    "1d": (5,),
    "2d": (4, 5),
    "3d": (2, 3, 5),
    "4d": (2, 1, 3, 5),
    "empty": (0, 5),
    "empty-3d": (2, 0, 5),
}


def make(shape, out=3, bias=True, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    W = torch.randn(out, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    return x, W, b


# complex: torch's gradient is dL/d(conj z), and gradcheck checks it (Wirtinger)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["real", "complex"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_linear_gradcheck_and_gradgradcheck(shape, bias, dtype):
    inputs = make(shape, bias=bias, dtype=dtype)
    assert gradcheck(LinearFunction.apply, inputs)
    assert gradgradcheck(LinearFunction.apply, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_linear_matches_torch(shape, bias, dtype):
    ours = manual_grad.Linear(shape[-1], 3, bias=bias, dtype=dtype)
    theirs = torch.nn.Linear(shape[-1], 3, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, **tol(dtype))
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype))
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **tol(dtype), msg=name)


@pytest.mark.parametrize(
    "make_grad",
    [
        lambda y: torch.ones((), dtype=y.dtype).expand_as(y),  # what y.sum().backward() hands over
        lambda y: torch.randn(y.shape[::-1], dtype=y.dtype).t(),  # transposed
        lambda y: torch.randn(y.shape[0], 2 * y.shape[1], dtype=y.dtype)[:, ::2],  # strided
    ],
    ids=["expanded", "transposed", "strided"],
)
def test_linear_accepts_non_contiguous_incoming_gradient(make_grad):
    x, W, b = make((6, 4), out=5)
    y = LinearFunction.apply(x, W, b)
    g = make_grad(y)
    assert not g.is_contiguous()
    gx, gW, gb = torch.autograd.grad(y, (x, W, b), g)
    ref = torch.nn.functional.linear(x, W, b)
    rx, rW, rb = torch.autograd.grad(ref, (x, W, b), g.contiguous())
    torch.testing.assert_close((gx, gW, gb), (rx, rW, rb))


def test_linear_accepts_non_contiguous_input():
    x = torch.randn(5, 6, dtype=torch.float64).t().requires_grad_()  # (6, 5), transposed
    W = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(LinearFunction.apply, (x, W, None))
    y = MF.linear(x, W)
    y.sum().backward()
    torch.testing.assert_close(y, x @ W.t())


@pytest.mark.parametrize(
    "needs", list(itertools.product([False, True], repeat=3)), ids=lambda n: "".join(
        name if flag else "-" for name, flag in zip("xWb", n, strict=True))
)
def test_linear_computes_only_requested_gradients(needs):
    n, d_in, d_out = 8, 7, 5
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=needs[0])
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=needs[1])
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=needs[2])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = LinearFunction.apply(x, W, b)
    if not any(needs):
        assert y.grad_fn is None
        return
    # dL/dx needs only W, dL/dW only x: nothing else is kept alive for backward.
    assert len(saved) == int(needs[0]) + int(needs[1])
    wanted = [t for t, flag in zip((x, W, b), needs, strict=True) if flag]
    g = torch.randn(n, d_out, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        grads = torch.autograd.grad(y, wanted, g)
    # each of dL/dx and dL/dW is one (n x d_out x d_in) product: 2 n d_in d_out flops
    assert counter.get_total_flops() == 2 * n * d_in * d_out * (int(needs[0]) + int(needs[1]))
    ref = torch.nn.functional.linear(x, W, b)
    torch.testing.assert_close(grads, torch.autograd.grad(ref, wanted, g))


def test_linear_module_mirrors_torch_nn_linear():
    torch.manual_seed(3)
    ours = manual_grad.Linear(784, 50)
    torch.manual_seed(3)
    theirs = torch.nn.Linear(784, 50)
    # same default initialisation for the same seed, same names, same repr
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    assert list(ours.state_dict()) == ["weight", "bias"]
    assert ours.extra_repr() == theirs.extra_repr() == "in_features=784, out_features=50, bias=True"
    assert list(manual_grad.Linear(3, 2, bias=False).state_dict()) == ["weight"]
    ours.reset_parameters()
    assert not torch.equal(ours.weight, theirs.weight)
    assert ours.weight.abs().max() <= 1 / 784**0.5  # kaiming_uniform(a=sqrt(5)) bound


def test_linear_module_device_and_dtype_arguments():
    layer = manual_grad.Linear(4, 2, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.device.type == "cpu"
    assert layer(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("direction", ["manual->torch", "torch->manual"])
def test_linear_state_dict_loads_both_ways(direction, tmp_path):
    src, dst = manual_grad.Linear(6, 4), torch.nn.Linear(6, 4)
    if direction == "torch->manual":
        src, dst = dst, src
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(3, 6)
    torch.testing.assert_close(dst(x), src(x))


def test_linear_wrong_last_dimension_names_in_features():
    layer = manual_grad.Linear(784, 50)
    with pytest.raises(ValueError, match=r"in_features=784.*\(32, 28, 28\)"):
        layer(torch.randn(32, 28, 28))
    with pytest.raises(ValueError, match="in_features=784"):
        layer(torch.tensor(1.0))


def test_linear_dtype_mix_is_a_clear_error():
    layer = manual_grad.Linear(4, 2)
    with pytest.raises(TypeError, match=r"input is torch.float64 but weight is torch.float32"):
        layer(torch.randn(3, 4, dtype=torch.float64))


def test_linear_device_mix_is_a_clear_error():
    x = torch.randn(3, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"different devices.*input on meta.*weight on cpu"):
        manual_grad.Linear(4, 2)(x)


def test_linear_bad_weight_and_bias_shapes():
    with pytest.raises(ValueError, match="weight must be 2-D"):  # (1-D is a dot product)
        MF.linear(torch.randn(2, 3), torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        MF.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3))


def test_linear_autocast_follows_torch_dtypes():
    ours = manual_grad.Linear(8, 4)
    theirs = torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ours(x), theirs(x)
        # an input that is already bf16 (from an earlier autocast layer) is fine too
        y3 = ours(x.to(torch.bfloat16))
    assert y1.dtype == y2.dtype == y3.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2)
    y1.float().sum().backward()
    y2.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32  # the parameter's dtype, not bf16
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_a_1d_weight_is_a_dot_product_as_in_torch():
    # torch 2.15's op_db samples F.linear(x, w) with w of shape (in,): y = x @ w, shape (*)
    import torch.nn.functional as TF

    import manual_grad.functional as MF

    for shape in [(8, 3), (2, 5, 3), (3,)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, dtype=torch.float64, requires_grad=True)
        ours, theirs = MF.linear(x, w), TF.linear(x, w)
        assert ours.shape == theirs.shape == shape[:-1]
        torch.testing.assert_close(ours, theirs)
        assert torch.autograd.gradcheck(MF.linear, (x, w))
    bias = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(MF.linear(x, w, bias), TF.linear(x, w, bias))
    assert torch.autograd.gradcheck(MF.linear, (x, w, bias))
    x2 = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # torch refuses a bias with a 2-D input...
        TF.linear(x2, w, bias)
    with pytest.raises(ValueError, match="weight must be 2-D"):  # ...and so do we
        MF.linear(x2, w, bias)
