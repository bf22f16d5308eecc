"""Hostile inputs: whatever torch.nn returns, manual_grad returns too, or a clear error.

Property-based (hypothesis) over shapes, dtypes and options, plus NaN/Inf, extreme
magnitudes, channels_last and expanded tensors, and a long loop that must not leak.
"""

import gc
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

import manual_grad

DTYPES = st.sampled_from([torch.float32, torch.float64])
BATCH = st.lists(st.integers(0, 4), min_size=0, max_size=3)


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}


def compare(ours_fn, theirs_fn, tensors, dtype, grad_out=None):
    """Forward and every input gradient of ours_fn and theirs_fn on copies of tensors."""
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    ya, yb = ours_fn(*a), theirs_fn(*b)
    torch.testing.assert_close(ya, yb, equal_nan=True, **tol(dtype))
    g = torch.randn_like(ya) if grad_out is None else grad_out(ya)
    wanted = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not wanted:
        return
    ga = torch.autograd.grad(ya, [a[i] for i in wanted], g, allow_unused=True)
    gb = torch.autograd.grad(yb, [b[i] for i in wanted], g, allow_unused=True)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, equal_nan=True, **tol(dtype))


@settings(max_examples=60, deadline=None)
@given(batch=BATCH, d_in=st.integers(1, 6), d_out=st.integers(1, 6), bias=st.booleans(),
       dtype=DTYPES, transpose=st.booleans())
def test_linear_property_matches_torch(batch, d_in, d_out, bias, dtype, transpose):
    ours = manual_grad.Linear(d_in, d_out, bias=bias, dtype=dtype)
    theirs = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*batch, d_in, dtype=dtype)
    if transpose and x.dim() >= 2:  # a non-contiguous input with the same values
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    compare(ours, theirs, [x.requires_grad_()], dtype)
    for p1, p2 in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (p1.grad is None) == (p2.grad is None)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), dtype=DTYPES)
def test_relu_property_matches_torch(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    x[x.abs() < 0.3] = 0.0  # exact zeros, where the choice of subgradient shows
    compare(manual_grad.ReLU(), nn.ReLU(), [x.requires_grad_()], dtype)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3), dtype=DTYPES,
       reduction=st.sampled_from(["mean", "sum", "none"]), target_grad=st.booleans())
def test_mse_property_matches_torch(shape, dtype, reduction, target_grad):
    u = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = torch.randn(shape, dtype=dtype, requires_grad=target_grad)
    compare(manual_grad.MSELoss(reduction=reduction), nn.MSELoss(reduction=reduction),
            [u, y], dtype)


SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-30, 0.0, -0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_and_extreme_magnitudes_propagate_like_torch(dtype):
    x = torch.tensor(SPECIALS, dtype=dtype).repeat(3, 1)[:, :8]  # (3, 8)
    ours = manual_grad.Linear(8, 4, dtype=dtype)
    theirs = nn.Linear(8, 4, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    compare(ours, theirs, [x.clone().requires_grad_()], dtype)
    compare(manual_grad.ReLU(), nn.ReLU(), [x.clone().requires_grad_()], dtype)
    target = torch.tensor(SPECIALS[::-1], dtype=dtype).repeat(3, 1)
    for reduction in ("mean", "sum", "none"):
        compare(manual_grad.MSELoss(reduction=reduction), nn.MSELoss(reduction=reduction),
                [x.clone().requires_grad_(), target.requires_grad_()], dtype)


def test_channels_last_and_expanded_tensors_match_torch():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    ours, theirs = manual_grad.Linear(5, 2), nn.Linear(5, 2)
    theirs.load_state_dict(ours.state_dict())
    compare(ours, theirs, [x.requires_grad_()], torch.float32)
    compare(manual_grad.ReLU(), nn.ReLU(), [x.detach().requires_grad_()], torch.float32)
    expanded = torch.randn(1, 5).expand(6, 5)  # stride 0 along the batch
    compare(ours, theirs, [expanded.requires_grad_()], torch.float32)
    compare(manual_grad.MSELoss(), nn.MSELoss(),
            [torch.randn(6, 5).requires_grad_(), torch.randn(5).expand(6, 5)], torch.float32)


@pytest.mark.parametrize(
    ("layer", "args", "message"),
    [
        (manual_grad.Linear(4, 2), (torch.randn(3, 5),), r"linear: expected input of shape"),
        (manual_grad.Linear(4, 2), (torch.randn(3, 4, dtype=torch.float64),),
         r"linear: input is torch.float64 but weight is torch.float32"),
        (manual_grad.MSELoss(), (torch.randn(3, 1), torch.randn(3)), r"mse_loss: input shape"),
        (manual_grad.MSELoss(), (torch.randn(3), torch.randn(3, dtype=torch.float64)),
         r"mse_loss: input is torch.float32 but target is torch.float64"),
        (manual_grad.MSELoss(), (torch.randn(3), torch.randn(3, device="meta")),
         r"mse_loss: tensors are on different devices"),
    ],
    ids=["linear-shape", "linear-dtype", "mse-shape", "mse-dtype", "mse-device"],
)
def test_bad_inputs_name_the_layer_and_what_is_wrong(layer, args, message):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        layer(*args)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _compiles(t: torch.Tensor) -> bool:
    """Whether t is one of torch.compile's tracing tensors (fake, or functional around a
    fake), which earlier tests in the same process leave to be freed late."""
    return isinstance(t, FakeTensor | FunctionalTensor) or torch._is_functional_tensor(t)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="needs /proc to read resident memory")
def test_ten_thousand_steps_hold_memory_flat():
    if os.environ.get("MANUAL_GRAD_FRESH_PROCESS") != "1":
        # in a process of its own: objects of earlier tests (torch.compile's, torch.func's)
        # freed late, in cycles or not, would move the counts below
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{__file__}::test_ten_thousand_steps_hold_memory_flat"],
            env={**os.environ, "MANUAL_GRAD_FRESH_PROCESS": "1"}, capture_output=True,
            text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:]
        return
    torch.manual_seed(0)
    model = nn.Sequential(manual_grad.Linear(32, 16), manual_grad.ReLU(),
                          manual_grad.Linear(16, 1))
    loss_fn = manual_grad.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(64)

    def steps(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x).squeeze(-1), y).backward()
            opt.step()

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and not _compiles(o))

    steps(500)
    tensors, rss = live_tensors(), _rss_bytes()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to look at it
    try:  # a tensor kept on ctx makes a reference cycle per step (pytorch#25340)
        steps(1000)
        gc.collect()
        # (FakeTensors and the FunctionalTensors around them are torch.compile's, left by
        # earlier tests in the same process and freed late; the eager steps here make none)
        cyclic = [o for o in gc.garbage if (torch.is_tensor(o) and not _compiles(o))
                  or isinstance(o, torch.autograd.function.BackwardCFunction)]
        assert cyclic == [], f"{len(cyclic)} tensors or autograd contexts were in cycles"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    steps(10_000)
    # no ctx, graph or saved tensor survives a step: the count of live tensors is unchanged
    assert live_tensors() == tensors
    assert _rss_bytes() - rss < 8 * 2**20  # and resident memory grows by less than 8 MiB


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: manual_grad.CrossEntropyLoss()(torch.randn(4, 3), torch.tensor([0, 1, 3, 2])),
         IndexError, r"cross_entropy: target holds class 3 but the input has 3 classes"),
        (lambda: manual_grad.CrossEntropyLoss()(torch.randn(4, 3),
                                                torch.tensor([0, -100, -2, 2])),
         IndexError, r"cross_entropy: target holds class -2 but the input has 3 classes"),
        (lambda: manual_grad.CrossEntropyLoss(ignore_index=1)(torch.randn(4, 3),
                                                              torch.tensor([1, 0, 7, 2])),
         IndexError, r"cross_entropy: target holds class 7 but the input has 3 classes"),
        (lambda: manual_grad.CrossEntropyLoss()(torch.randn(4, 3), torch.zeros(4, 1).long()),
         ValueError, r"need class-index targets of shape \(4,\), got \(4, 1\)"),
        (lambda: manual_grad.CrossEntropyLoss(weight=torch.ones(2))(torch.randn(4, 3),
                                                                    torch.zeros(4).long()),
         ValueError, r"weight must have shape \(3,\), got \(2,\)"),
        (lambda: manual_grad.Conv2d(3, 4, 3)(torch.randn(2, 1, 8, 8)), ValueError,
         r"conv2d: input has 1 channels \(shape \(2, 1, 8, 8\)\) but the weight"),
        (lambda: manual_grad.Conv2d(3, 4, 3)(torch.randn(8, 8)), ValueError,
         r"conv2d: expected input \(N, C, H, W\) or \(C, H, W\), got \(8, 8\)"),
        (lambda: manual_grad.Embedding(5, 2)(torch.tensor([1, 5])), IndexError,
         r"embedding: index 5 is out of range for 5 embeddings"),
        (lambda: manual_grad.Embedding(5, 2, sparse=True)(torch.tensor([1])),
         NotImplementedError, r"embedding: sparse=True is not supported"),
        (lambda: manual_grad.LayerNorm(4)(torch.randn(3, 5)), ValueError,
         r"layer_norm: expected input of shape \(\*, 4\) \(normalized_shape\), got \(3, 5\)"),
        (lambda: manual_grad.BatchNorm1d(3)(torch.randn(1, 3)), ValueError,
         r"batch_norm: training needs more than one value per channel"),
        (lambda: manual_grad.L1Loss()(torch.randn(3, 1), torch.randn(3)), ValueError,
         r"l1_loss: input shape \(3, 1\) and target shape \(3,\) differ"),
        (lambda: manual_grad.GELU("fast")(torch.randn(3)), ValueError,
         r"gelu: approximate must be 'none' or 'tanh'"),
        (lambda: manual_grad.Softmax(2)(torch.randn(3, 4)), IndexError,
         r"softmax: dim 2 is out of range for an input of shape \(3, 4\)"),
        (lambda: manual_grad.LeakyReLU(-0.1, inplace=True)(torch.randn(3)), ValueError,
         r"leaky_relu: inplace=True needs negative_slope >= 0"),
        # refused by torch, and so here (they ran, silently, before)
        (lambda: manual_grad.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3)), ValueError,
         r"batch_norm: eps must be positive in training, got 0.0"),
        (lambda: manual_grad.CrossEntropyLoss(ignore_index=1)(
            torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)), ValueError,
         r"cross_entropy: ignore_index=1 does not apply to class-probability targets"),
        (lambda: manual_grad.LeakyReLU()(torch.tensor([1, -2])), TypeError,
         r"leaky_relu: expected a floating-point tensor, got torch.int64"),
        (lambda: manual_grad.GELU()(torch.tensor([1, -2])), TypeError,
         r"gelu: expected a floating-point tensor, got torch.int64"),
        (lambda: manual_grad.SiLU()(torch.tensor([1, -2])), TypeError,
         r"silu: expected a floating-point tensor, got torch.int64"),
        (lambda: manual_grad.ReLU()(torch.tensor([True])), TypeError,
         r"relu: boolean inputs are not supported"),
    ],
    ids=["ce-class-range", "ce-negative-class-beside-ignored", "ce-range-ignore-in-range",
         "ce-target-shape", "ce-weight-shape", "conv-channels",
         "conv-rank", "embedding-range", "embedding-sparse", "layernorm-shape",
         "batchnorm-one-value", "l1-shape", "gelu-approximate", "softmax-dim",
         "leaky-inplace-negative", "batchnorm-eps0", "ce-probabilities-ignore-index",
         "leaky-int", "gelu-int", "silu-int", "relu-bool"],
)
def test_library_bad_inputs_name_the_layer_and_the_fix(call, error, message):
    with pytest.raises(error, match=message):
        call()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(2, 6), spatial=st.lists(st.integers(1, 3),
                                                                   max_size=2),
       reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0, 0.3]),
       weighted=st.booleans(), dtype=DTYPES)
def test_cross_entropy_property_matches_torch(n, c, spatial, reduction, smoothing, weighted,
                                              dtype):
    logits = torch.randn(n, c, *spatial, dtype=dtype, requires_grad=True)
    target = torch.randint(0, c, (n, *spatial))
    weight = torch.rand(c, dtype=dtype) + 0.1 if weighted else None
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
    compare(manual_grad.CrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs),
            [logits, target], dtype)


@settings(max_examples=30, deadline=None)
@given(c_in=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       h=st.integers(4, 7), bias=st.booleans(), dtype=DTYPES)
def test_conv2d_property_matches_torch(c_in, groups, k, stride, padding, dilation, h, bias,
                                       dtype):
    assume(dilation * (k - 1) + 1 <= h + 2 * padding)  # the kernel fits the padded image
    c_in, c_out = c_in * groups, 2 * groups
    ours = manual_grad.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias,
                              dtype=dtype)
    theirs = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    compare(ours, theirs, [torch.randn(2, c_in, h, h + 1, dtype=dtype).requires_grad_()], dtype)


@settings(max_examples=60, deadline=None)
@given(k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 1), st.integers(0, 1)), ceil_mode=st.booleans(),
       count_include_pad=st.booleans(), divisor=st.sampled_from([None, 3]),
       hw=st.tuples(st.integers(1, 8), st.integers(1, 8)), dtype=DTYPES)
def test_avg_pool2d_property_matches_torch(k, stride, padding, ceil_mode, count_include_pad,
                                           divisor, hw, dtype):
    """Any window geometry, ceil_mode's partial last windows included: torch's values and
    gradients (whatever torch refuses, such as padding over half the window, is skipped)."""
    kwargs = {"kernel_size": k, "stride": stride, "padding": padding, "ceil_mode": ceil_mode,
              "count_include_pad": count_include_pad, "divisor_override": divisor}
    x = torch.randn(2, 3, *hw, dtype=dtype)
    try:
        nn.AvgPool2d(**kwargs)(x)
    except RuntimeError:
        assume(False)
    compare(manual_grad.AvgPool2d(**kwargs), nn.AvgPool2d(**kwargs), [x.requires_grad_()],
            dtype)


ELEMENTWISE = ["LeakyReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "Softmax", "LogSoftmax",
               "Flatten"]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(ELEMENTWISE), shape=st.lists(st.integers(1, 4), min_size=1,
                                                           max_size=4), dtype=DTYPES)
def test_shape_agnostic_layers_property_match_torch(name, shape, dtype):
    args = (-1,) if name in ("Softmax", "LogSoftmax") else ()
    if name == "Flatten" and len(shape) < 2:
        shape = [*shape, 2]
    x = torch.randn(shape, dtype=dtype)
    compare(getattr(manual_grad, name)(*args), getattr(nn, name)(*args),
            [x.requires_grad_()], dtype)


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh", "GELU", "SiLU", "LeakyReLU"])
def test_activations_propagate_nan_inf_like_torch(name):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 1e-30],
                     dtype=torch.float64)
    compare(getattr(manual_grad, name)(), getattr(nn, name)(), [x.requires_grad_()],
            torch.float64)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(("dtype", "weight_dtype"), [
    (torch.float32, torch.float64), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float64, torch.float32)])
def test_bce_with_weights_of_another_dtype_keeps_the_input_dtype(dtype, weight_dtype,
                                                                   reduction):
    """torch.nn's BCEWithLogitsLoss returns the input's dtype whatever its weight's and
    pos_weight's dtypes (a float64 pos_weight does not make a float32 model's loss
    float64); so does ours, computing in the promoted dtype first."""
    torch.manual_seed(0)
    weight, pos_weight = torch.rand(3, dtype=weight_dtype), torch.rand(3, dtype=weight_dtype)
    x, y = torch.randn(4, 3, dtype=dtype), torch.rand(4, 3, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = manual_grad.BCEWithLogitsLoss(weight, reduction=reduction, pos_weight=pos_weight)(a, y)
    theirs = nn.BCEWithLogitsLoss(weight, reduction=reduction, pos_weight=pos_weight)(b, y)
    assert ours.dtype == theirs.dtype == dtype
    g = torch.rand_like(ours)
    ours.backward(g)
    theirs.backward(g)
    assert a.grad.dtype == b.grad.dtype == dtype
    low = dtype in (torch.bfloat16, torch.float16)
    close = {"rtol": 2e-2, "atol": 2e-2} if low else tol(torch.float32)
    torch.testing.assert_close(ours, theirs, **close)
    torch.testing.assert_close(a.grad, b.grad, **close)


def test_torch_refuses_and_so_do_we_with_the_same_kind_of_input():
    """Each refusal above is one torch makes too (the oracle), not one of our own."""
    import torch.nn.functional as TF
    for call in (lambda: TF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
                 lambda: TF.cross_entropy(torch.randn(3, 4), torch.softmax(
                     torch.randn(3, 4), 1), ignore_index=1),
                 lambda: TF.leaky_relu(torch.tensor([1, -2])),
                 lambda: TF.gelu(torch.tensor([1, -2])),
                 lambda: TF.silu(torch.tensor([1, -2])),
                 lambda: TF.relu(torch.tensor([True]))):
        with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
            call()


def test_relu_keeps_an_integer_dtype_and_its_exact_values():
    x = torch.tensor([2**40 + 1, -3, 0])
    for inplace in (False, True):
        y = manual_grad.ReLU(inplace=inplace)(x.clone())
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.relu(x))  # 2**40 + 1 exactly, not rounded to float32


def test_a_refused_batch_changes_no_batchnorm_state():
    layer = manual_grad.BatchNorm1d(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError):
        layer(torch.randn(1, 3))  # one value per channel
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_empty_training_batch_runs_as_in_torch():
    for lib in (nn, manual_grad):
        layer = lib.BatchNorm2d(3)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert torch.equal(layer.running_mean, torch.zeros(3))  # unchanged, as torch's
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("kwargs", [{}, {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0])},
                                    {"label_smoothing": 0.2}],
                         ids=["plain", "weight", "smoothing"])
def test_a_fully_padded_batch_gives_torchs_zero_gradient(kwargs):
    """Every target is ignore_index (a batch of padding): the 'mean' loss is 0/0 = NaN in
    torch too, but the gradient is 0, not NaN, so one such batch does not poison every
    parameter."""
    target = torch.full((5,), 2)
    grads = []
    for lib in (nn, manual_grad):
        z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        loss = lib.CrossEntropyLoss(ignore_index=2, **kwargs)(z, target)
        assert loss.isnan()
        loss.backward()
        grads.append(z.grad)
    assert torch.equal(grads[1], torch.zeros(5, 4))
    torch.testing.assert_close(grads[1], grads[0])
