"""linear_relu_mse_loss: the seed's computation with its gradients summed in one pass.
Oracles: gradcheck/gradgradcheck in float64, and torch.nn's autograd on the same inputs."""

import unittest.mock as mock

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
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


# --- mlp_mse_loss: FusedMLP's linear -> ReLU -> linear and the loss, one Function ---

def make_mlp(n, d_in, hidden, d_out, dtype=torch.float64, bias=True, seed=0, grad_x=True,
             grad_y=False):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, grad=True, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    # weights at nn.Linear's scale, 1/sqrt(fan_in): activations stay of order one
    return (t(n, d_in, grad=grad_x), t(hidden, d_in, scale=d_in ** -0.5),
            t(hidden) if bias else None, t(d_out, hidden, scale=hidden ** -0.5),
            t(d_out) if bias else None, t(n, d_out, grad=grad_y))


def torch_mlp_loss(x, W1, b1, W2, b2, y, reduction="mean"):
    return TF.mse_loss(TF.linear(torch.relu(TF.linear(x, W1, b1)), W2, b2), y,
                       reduction=reduction)


def leaves(args):
    return tuple(t for t in args if t is not None and t.requires_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gradcheck_and_gradgradcheck(small_chunks, reduction, bias):
    x, W1, b1, W2, b2, y = make_mlp(7, 5, 4, 3, bias=bias, grad_y=True)

    def f(x, W1, W2, y, *biases):
        b1, b2 = biases or (None, None)
        return MF.mlp_mse_loss(x, W1, b1, W2, b2, y, reduction)

    args = (x, W1, W2, y, *((b1, b2) if bias else ()))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "d_in", "hidden", "d_out"),
                         [(7, 5, 4, 3), (64, 784, 50, 1), (1, 4, 3, 2), (0, 3, 4, 2)])
def test_mlp_matches_torch_nn(small_chunks, dtype, n, d_in, hidden, d_out):
    ours = make_mlp(n, d_in, hidden, d_out, dtype, grad_y=True)
    theirs = make_mlp(n, d_in, hidden, d_out, dtype, grad_y=True)
    loss, expected = MF.mlp_mse_loss(*ours), torch_mlp_loss(*theirs)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, expected, equal_nan=True, **tol)
    for a, b in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(expected, theirs),
                    strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_mlp_mse_loss_is_the_loss_of_its_output_and_steps_like_torch_nn():
    torch.manual_seed(0)
    ours = manual_grad.FusedMLP(784, 50, 1)
    theirs = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(),
                                 torch.nn.Linear(50, 1))
    theirs.load_state_dict(ours.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05)
    x, y = torch.randn(300, 784), torch.randint(0, 10, (300,)).float()
    for step in range(3):  # (n,) targets against one output: the seed's layout
        for opt in (opt_ours, opt_theirs):
            opt.zero_grad()
        loss = ours.mse_loss(x, y)
        expected = torch.nn.functional.mse_loss(theirs(x).squeeze(-1), y)
        torch.testing.assert_close(loss, expected, msg=f"step {step}")
        loss.backward()
        expected.backward()
        for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, msg=f"step {step}: {name}")
        opt_ours.step()
        opt_theirs.step()


def test_mlp_gradients_only_where_asked_and_each_backward_its_own():
    x, W1, b1, W2, b2, y = make_mlp(9, 4, 5, 2, grad_x=False)
    W2.requires_grad_(False)
    loss = MF.mlp_mse_loss(x, W1, b1, W2, b2, y)
    loss.backward(retain_graph=True)
    first = W1.grad.clone()
    assert W2.grad is None and x.grad is None
    loss.backward(retain_graph=True)  # a second pass: the sums were used, so recomputed
    torch.testing.assert_close(W1.grad, 2 * first)
    W1.grad.zero_()  # what a user does to .grad never reaches a later backward
    (loss * 3.0).backward()  # and an incoming gradient other than 1 scales them
    (expected,) = torch.autograd.grad(torch_mlp_loss(x, W1, b1, W2, b2, y) * 3.0, W1)
    torch.testing.assert_close(W1.grad, expected)


def test_mlp_no_grad_vmap_and_compile():
    x, W1, b1, W2, b2, y = make_mlp(6, 4, 5, 2, grad_x=False)
    with torch.no_grad():
        loss = MF.mlp_mse_loss(x, W1, b1, W2, b2, y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, torch_mlp_loss(x, W1, b1, W2, b2, y).detach())
    per_sample = torch.func.vmap(torch.func.grad(
        lambda W, xi, yi: MF.mlp_mse_loss(xi[None], W, b1.detach(), W2.detach(),
                                          b2.detach(), yi[None])),
        in_dims=(None, 0, 0))(W1.detach(), x, y)
    expected = torch.stack([torch.autograd.grad(
        torch_mlp_loss(x[i:i + 1], W1, b1, W2, b2, y[i:i + 1]), W1)[0] for i in range(6)])
    torch.testing.assert_close(per_sample, expected)
    compiled = torch.compile(MF.mlp_mse_loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, W1, b1, W2, b2, y), (W1, W2))
    want = torch.autograd.grad(torch_mlp_loss(x, W1, b1, W2, b2, y), (W1, W2))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y": torch.randn(4, 3)}, r"target shape"),
        ({"b1": torch.randn(1)}, r"second|bias must have shape"),
        ({"W2": torch.randn(2, 4)}, r"second weight must have shape"),
        ({"y": torch.randn(4, 2, dtype=torch.float64)}, r"target\.to\(input\.dtype\)"),
        ({"x": torch.randn(4, 5)}, r"in_features"),
        ({"reduction": "none"}, r"reduction='none'"),
    ],
)
def test_mlp_bad_input_is_named(change, message):
    args = dict(zip(("x", "W1", "b1", "W2", "b2", "y"),
                    make_mlp(4, 3, 5, 2, torch.float32, grad_x=False), strict=True))
    args["reduction"] = "mean"
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        MF.mlp_mse_loss(*args.values())


def test_mlp_autocast_runs_the_block_then_the_loss_like_torch():
    x, W1, b1, W2, b2, y = make_mlp(8, 6, 5, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = MF.mlp_mse_loss(x, W1, b1, W2, b2, y)
        theirs = torch_mlp_loss(x, W1, b1, W2, b2, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


def test_a_gradient_forward_was_not_told_to_sum_is_still_computed():
    # called directly, with with_grads naming only W1: W2's gradient is summed in backward
    from manual_grad.functions import MLPMSELossFunction

    x, W1, b1, W2, b2, y = make_mlp(6, 4, 5, 2, grad_x=False)
    loss = MLPMSELossFunction.apply(x, W1, b1, W2, b2, y, "mean",
                                    (False, True, False, False, False, False))[0]
    got = torch.autograd.grad(loss, (W1, b1, W2, b2))
    want = torch.autograd.grad(torch_mlp_loss(x, W1, b1, W2, b2, y), (W1, b1, W2, b2))
    torch.testing.assert_close(got, want)


# --- mlp_mse_loss(..., rows=): the batch gathered from a whole dataset as it is summed ---

def dataset_and_rows(n_data=40, n=23, d_in=5, hidden=4, d_out=3, dtype=torch.float64,
                     bias=True, seed=0):
    """A dataset (X, Y) that needs no gradient, parameters that do, and a batch's rows
    (repeats included, as a sampler with replacement gives)."""
    X, W1, b1, W2, b2, Y = make_mlp(n_data, d_in, hidden, d_out, dtype, bias, seed,
                                    grad_x=False)
    rows = torch.randint(0, n_data, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return X, W1, b1, W2, b2, Y, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_loss_of_rows_is_the_loss_of_the_gathered_batch(small_chunks, dtype, reduction,
                                                           bias):
    # small_chunks: the 23 rows are gathered 3 per thread at a time into the reused buffer
    X, W1, b1, W2, b2, Y, rows = dataset_and_rows(dtype=dtype, bias=bias)
    params = leaves((W1, b1, W2, b2))
    loss = MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, reduction, rows=rows)
    gathered = MF.mlp_mse_loss(X[rows], W1, b1, W2, b2, Y[rows], reduction)
    expected = torch_mlp_loss(X[rows], W1, b1, W2, b2, Y[rows], reduction)  # torch.nn
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, gathered, **tol)
    torch.testing.assert_close(loss, expected, **tol)
    for ours, theirs in zip(torch.autograd.grad(loss, params),
                            torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(ours, theirs, **tol)


def test_mlp_loss_of_rows_gradcheck_gradgradcheck_and_a_retained_graph(small_chunks):
    X, W1, b1, W2, b2, Y, rows = dataset_and_rows(n=8)

    def f(W1, b1, W2, b2):
        return MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows)

    assert gradcheck(f, (W1, b1, W2, b2))
    assert gradgradcheck(f, (W1, b1, W2, b2))
    loss = f(W1, b1, W2, b2)
    first = torch.autograd.grad(loss, (W1, W2), retain_graph=True)
    again = torch.autograd.grad(loss, (W1, W2))  # the sums were taken: summed again
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_fused_mlp_steps_from_rows_exactly_as_from_gathered_batches():
    torch.manual_seed(0)
    X, Y = torch.randn(500, 784), torch.randint(0, 10, (500,)).float()
    a = manual_grad.FusedMLP(784, 50, 1)
    b = manual_grad.FusedMLP(784, 50, 1)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (a, b)]
    for rows in torch.randperm(500).split(128):  # the seed's (n,) targets, a short last batch
        for opt in opts:
            opt.zero_grad()
        a.mse_loss(X, Y, rows=rows).backward()
        b.mse_loss(X[rows], Y[rows]).backward()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_mlp_loss_of_rows_where_nothing_is_summed_is_the_gathered_call():
    X, W1, b1, W2, b2, Y, rows = dataset_and_rows()
    with torch.no_grad():
        torch.testing.assert_close(MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows),
                                   torch_mlp_loss(X[rows], W1, b1, W2, b2, Y[rows]))
    # a dataset that itself requires grad gets its rows' gradients, as X[rows] would
    X.requires_grad_()
    (gx,) = torch.autograd.grad(MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows), X)
    (want,) = torch.autograd.grad(torch_mlp_loss(X[rows], W1, b1, W2, b2, Y[rows]), X)
    torch.testing.assert_close(gx, want)
    X.requires_grad_(False)
    compiled = torch.compile(lambda *a: MF.mlp_mse_loss(*a, rows=rows), backend="aot_eager",
                             fullgraph=True)
    got = torch.autograd.grad(compiled(X, W1, b1, W2, b2, Y), (W1, W2))
    want = torch.autograd.grad(torch_mlp_loss(X[rows], W1, b1, W2, b2, Y[rows]), (W1, W2))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        (torch.tensor([0, 40]), IndexError, r"the 40 rows of input \(0 <= i < 40\)"),
        (torch.tensor([-1, 3]), IndexError, r"got values from -1 to 3"),
        (torch.tensor([0.0, 1.0]), TypeError, r"int64"),
        (torch.zeros(2, 2, dtype=torch.long), TypeError, r"1-D"),
    ],
)
def test_mlp_loss_of_bad_rows_is_named(rows, error, message):
    X, W1, b1, W2, b2, Y, _ = dataset_and_rows()
    with pytest.raises(error, match=message):
        MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows)
    with torch.no_grad(), pytest.raises(error, match=message):  # the gathering path too
        MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows)


@pytest.mark.parametrize("with_rows", [True, False])
def test_mlp_loss_names_tensors_on_two_devices(with_rows):
    # the usual-case path reads no device; torch's failure is named as the checks would
    X, W1, b1, W2, b2, Y, rows = dataset_and_rows()
    W1, b1 = (t.detach().to("meta").requires_grad_() for t in (W1, b1))
    batch = (X, Y, rows) if with_rows else (X[rows], Y[rows], None)
    with pytest.raises(RuntimeError, match=r"different devices \(input on cpu, weight1 on "
                       r"meta, bias1 on meta"):
        MF.mlp_mse_loss(batch[0], W1, b1, W2, b2, batch[1], rows=batch[2])


def test_mlp_loss_of_rows_needs_the_whole_dataset_and_refuses_dataset_sums():
    from manual_grad.functions import MLPMSELossFunction

    X, W1, b1, W2, b2, Y, rows = dataset_and_rows()
    with pytest.raises(ValueError, match=r"same N"):
        MF.mlp_mse_loss(X, W1, b1, W2, b2, Y[:10], rows=rows)
    with pytest.raises(ValueError, match=r"gather the batch first"):
        MLPMSELossFunction.apply(X, W1, b1, W2, b2, Y, "mean", (True,) * 6, rows)


# --- blocks: on a CPU, a large batch is cut into one block of rows per thread ---

@pytest.fixture(params=[2, 3])
def blocks(request, monkeypatch):
    """Every batch whose size the thread count divides is cut into that many blocks (here
    2 or 3 whatever the machine has), in chunks of a few rows: the batched path, always."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: request.param)
    monkeypatch.setattr(single_pass, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(single_pass, "CHUNK_BYTES", 2 * 5 * 8)  # 2 rows of 5 per thread
    return request.param


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 3000), threads=st.integers(1, 16), row_bytes=st.integers(1, 10_000),
       min_rows=st.integers(1, 600))
def test_blocks_and_chunks_cover_every_row_once(n, threads, row_bytes, min_rows):
    x = torch.empty(0, row_bytes, dtype=torch.uint8)
    with mock.patch.object(torch, "get_num_threads", lambda: threads), \
            mock.patch.object(single_pass, "MIN_BLOCK_ROWS", min_rows):
        blocks, step = single_pass._blocks_and_chunk(x, n)
    per_thread = max(1, single_pass.CHUNK_BYTES // row_bytes)
    assert blocks in (1, threads) and step >= 1
    assert blocks * (n // blocks) == n  # the blocks hold every row
    if blocks > 1:
        assert n // blocks >= min_rows  # and are not smaller than asked
    else:
        assert n < threads * min_rows or n % threads or threads == 1
    m, budget = n // blocks, max(1, per_thread * threads // blocks)  # rows per block
    assert step <= max(budget, 1)  # a chunk's slice of each block fits the budget,
    chunks = len(range(0, m, step))
    assert chunks == -(-m // budget)  # in as few chunks as that allows (none for none),
    assert m == 0 or m - (chunks - 1) * step >= step - chunks  # of near-equal sizes


@pytest.mark.parametrize("n", [12, 13])  # split into blocks, and (13) not
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_loss_in_blocks_matches_torch_nn(blocks, n, bias):
    x, W1, b1, W2, b2, y = make_mlp(n, 5, 4, 3, bias=bias, grad_y=True)
    args = (x, W1, b1, W2, b2, y)
    loss, expected = MF.mlp_mse_loss(*args), torch_mlp_loss(*args)
    torch.testing.assert_close(loss, expected)
    params = leaves(args)
    for ours, theirs in zip(torch.autograd.grad(loss, params),
                            torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_mlp_loss_in_blocks_gradcheck_and_gradgradcheck(blocks):
    x, W1, b1, W2, b2, y = make_mlp(12, 5, 4, 3, grad_y=True)
    assert gradcheck(MF.mlp_mse_loss, (x, W1, b1, W2, b2, y))
    assert gradgradcheck(MF.mlp_mse_loss, (x, W1, b1, W2, b2, y))


def test_mlp_loss_in_blocks_of_a_strided_input_keeps_its_layout(blocks):
    x = torch.randn(5, 12, dtype=torch.float64).t().requires_grad_()  # (12, 5), strided
    _, W1, b1, W2, b2, y = make_mlp(12, 5, 4, 3)
    (gx,) = torch.autograd.grad(MF.mlp_mse_loss(x, W1, b1, W2, b2, y), x)
    (expected,) = torch.autograd.grad(torch_mlp_loss(x, W1, b1, W2, b2, y), x)
    torch.testing.assert_close(gx, expected)
    assert gx.stride() == x.stride()


@pytest.mark.parametrize("n", [24, 25])
def test_mlp_loss_of_rows_in_blocks_is_the_loss_of_the_gathered_batch(blocks, n):
    X, W1, b1, W2, b2, Y, rows = dataset_and_rows(n=n)
    params = leaves((W1, b1, W2, b2))
    loss = MF.mlp_mse_loss(X, W1, b1, W2, b2, Y, rows=rows)
    expected = torch_mlp_loss(X[rows], W1, b1, W2, b2, Y[rows])
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, params),
                            torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_mlp_loss_in_blocks_names_tensors_on_two_devices(blocks):
    # bmm, unlike mm, would compute a meta result from a CPU input and meta weights
    x, W1, b1, W2, b2, y = make_mlp(12, 5, 4, 3, grad_x=False)
    W1 = W1.detach().to("meta").requires_grad_()
    with pytest.raises(RuntimeError, match=r"different devices \(input on cpu, weight1 on "
                       r"meta"):
        MF.mlp_mse_loss(x, W1, b1, W2, b2, y)


@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("bias", [True, False])
def test_seed_loss_in_blocks_matches_torch_nn_and_gradchecks(blocks, n, bias):
    args = tuple(t for t in make(n, 5, 3, bias=bias, grad_y=True) if t is not None)

    def f(x, W, *rest):
        b, y = rest if bias else (None, *rest)
        return MF.linear_relu_mse_loss(x, W, b, y)

    loss = f(*args)
    expected = torch_loss(*(args if bias else (args[0], args[1], None, args[2])))
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, args),
                            torch.autograd.grad(expected, args), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_seed_loss_in_blocks_with_the_seeds_weight_layout(blocks):
    # w of shape (in, 1) as in the derivation, given as W = w.t().contiguous(): a (1, in)
    # tensor with strides (1, 1), which the batched products take in another layout
    x, _, b, y = make(12, 5, 1)
    W = torch.randn(5, 1, dtype=torch.float64).t().contiguous().requires_grad_()
    assert W.stride() == (1, 1)
    loss, expected = MF.linear_relu_mse_loss(x, W, b, y), torch_loss(x, W, b, y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, (x, W, b)),
                               torch.autograd.grad(expected, (x, W, b)))


def test_seed_loss_in_blocks_of_a_strided_input_and_two_devices(blocks):
    x = torch.randn(5, 12, dtype=torch.float64).t().requires_grad_()  # (12, 5), strided
    _, W, b, y = make(12, 5, 3)
    (gx,) = torch.autograd.grad(MF.linear_relu_mse_loss(x, W, b, y), x)
    (expected,) = torch.autograd.grad(torch_loss(x, W, b, y), x)
    torch.testing.assert_close(gx, expected)
    assert gx.stride() == x.stride()
    W = W.detach().to("meta").requires_grad_()
    with pytest.raises(RuntimeError, match=r"device"):
        MF.linear_relu_mse_loss(x.detach(), W, b, y)


# --- the single pass is chosen by measurement, per shape, never assumed ------------------

# rows of 784 float64s in one thread's chunk: a batch of 4 x this is cut up
CHUNK_ROWS = single_pass.CHUNK_BYTES // (784 * 8)


def test_single_pass_or_plain_is_measured_once_per_shape_and_kept(monkeypatch):
    monkeypatch.setattr(MF, "SINGLE_PASS", "auto")
    monkeypatch.setattr(MF, "_single_pass_choice", {})
    measured = []
    real = MF._no_slower

    def count(single, plain, tensors):
        measured.append(tuple(t.shape for t in tensors if t is not None))
        return real(single, plain, tensors)

    monkeypatch.setattr(MF, "_no_slower", count)
    # a batch cut into chunks (~2 MB of rows a thread): the case the choice is about
    x = torch.randn(4 * (CHUNK_ROWS + 1), 784)
    W = torch.randn(1, 784, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    y = torch.randn(len(x))
    for _ in range(3):
        MF.linear_relu_mse_loss(x, W, b, y).backward()
    MF.linear_relu_mse_loss(x[:64], W, b, y[:64]).backward()  # one chunk: nothing to time
    assert measured == [(x.shape, W.shape, b.shape, (len(x), 1))]
    assert W.grad is not None  # (3 steps' gradients, the measurement added none)


@pytest.mark.parametrize("faster", ["single", "plain"])
def test_either_choice_gives_the_same_loss_and_gradients(monkeypatch, faster):
    monkeypatch.setattr(MF, "SINGLE_PASS", "auto")
    monkeypatch.setattr(MF, "_single_pass_choice", {})
    monkeypatch.setattr(MF, "_no_slower", lambda *_: faster == "single")
    torch.manual_seed(0)
    x = torch.randn(4 * (CHUNK_ROWS + 1), 784, dtype=torch.float64)
    y = torch.randn(len(x), 3, dtype=torch.float64)
    W, b = torch.randn(3, 784, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    results = []
    for fn in (lambda *t: MF.linear_relu_mse_loss(*t), torch_loss):
        args = [t.clone().requires_grad_() for t in (x, W, b, y)]
        loss = fn(*args)
        results.append((loss, torch.autograd.grad(loss, args)))
    torch.testing.assert_close(results[0], results[1])
    layer = manual_grad.FusedMLP(784, 8, 3, dtype=torch.float64)
    theirs = torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, 3)).double()
    theirs.load_state_dict(layer.state_dict())
    loss = layer.mse_loss(x, y)
    loss.backward()
    expected = torch.nn.functional.mse_loss(theirs(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for p, q in zip(layer.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("faster", ["rows", "gathered"])
def test_rows_or_the_gathered_batch_is_measured_and_either_gives_the_same(monkeypatch,
                                                                          faster):
    monkeypatch.setattr(MF, "SINGLE_PASS", "auto")
    monkeypatch.setattr(MF, "_single_pass_choice", {})
    measured = []

    def decide(single, plain, tensors):
        measured.append(tuple(t.shape for t in tensors if t is not None))
        return faster == "rows"

    monkeypatch.setattr(MF, "_no_slower", decide)
    torch.manual_seed(0)
    data = torch.randn(6 * (CHUNK_ROWS + 1), 784, dtype=torch.float64)
    labels = torch.randn(len(data), dtype=torch.float64)
    rows = torch.randperm(len(data))[: 4 * (CHUNK_ROWS + 1)]  # a batch cut into chunks
    layer = manual_grad.FusedMLP(784, 8, 1, dtype=torch.float64)
    theirs = torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, 1)).double()
    theirs.load_state_dict(layer.state_dict())
    for _ in range(2):
        loss = layer.mse_loss(data, labels, rows=rows)
        loss.backward()
    expected = torch.nn.functional.mse_loss(theirs(data[rows]).squeeze(1), labels[rows])
    (expected * 2).backward()  # the two steps' gradients, summed
    torch.testing.assert_close(loss, expected)
    for p, q in zip(layer.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    # once for the shape, kept for the second call (the gathered batch then makes its
    # own single-pass choice, once too)
    once = 1 if faster == "rows" else 2
    assert len(measured) == once
    layer.mse_loss(data, labels, rows=rows[:64]).backward()  # one chunk: nothing to time
    assert len(measured) == once
