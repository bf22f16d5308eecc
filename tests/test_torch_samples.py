"""Outside oracles: PyTorch's own sample inputs, run through manual_grad.

``op_db`` (torch.testing._internal.common_methods_invocations) holds, for each torch
function, the sample inputs torch's own test suite runs it on, and the inputs it must
refuse (``error_inputs``); ``module_db`` (common_modules) does the same for modules, every
constructor option included. Each sample runs through torch and through manual_grad:

- where torch accepts it, manual_grad gives the same output, the same gradient for every
  tensor that requires one, and the same buffers (running statistics);
- where torch refuses it, manual_grad refuses it too;
- the only exceptions are the documented refusals below (README, "Refusals"): inputs
  torch accepts and manual_grad refuses on purpose, each with a reason.

Nothing here was chosen by this project: the inputs are torch's.
"""

import copy
import re
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

import manual_grad
from manual_grad import functional as MF
from manual_grad.convert import COUNTERPARTS

common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

# torch's name in op_db -> manual_grad.functional's counterpart
FUNCTIONS = {
    "nn.functional.linear": MF.linear,
    "nn.functional.relu": MF.relu,
    "nn.functional.leaky_relu": MF.leaky_relu,
    "sigmoid": MF.sigmoid,
    "tanh": MF.tanh,
    "nn.functional.gelu": MF.gelu,
    "nn.functional.silu": MF.silu,
    "softmax": MF.softmax,
    "log_softmax": MF.log_softmax,
    "nn.functional.mse_loss": MF.mse_loss,
    "nn.functional.l1_loss": MF.l1_loss,
    "nn.functional.huber_loss": MF.huber_loss,
    "nn.functional.binary_cross_entropy_with_logits": MF.binary_cross_entropy_with_logits,
    "nn.functional.cross_entropy": MF.cross_entropy,
    "nn.functional.layer_norm": MF.layer_norm,
    "nn.functional.batch_norm": MF.batch_norm,
    "nn.functional.conv2d": MF.conv2d,
    "nn.functional.max_pool2d": MF.max_pool2d,
    "nn.functional.avg_pool2d": MF.avg_pool2d,
    "flatten": MF.flatten,
    "nn.functional.hardswish": MF.hardswish,
    "nn.functional.hardtanh": MF.hardtanh,
    "nn.functional.relu6": MF.relu6,
    "nn.functional.hardsigmoid": MF.hardsigmoid,
    "nn.functional.adaptive_avg_pool2d": MF.adaptive_avg_pool2d,
    "nn.functional.group_norm": MF.group_norm,
    "nn.functional.rms_norm": MF.rms_norm,
    "nn.functional.conv1d": MF.conv1d,
    "nn.functional.scaled_dot_product_attention": MF.scaled_dot_product_attention,
    # op_db's embedding takes the weight first: (weight, indices)
    "nn.functional.embedding": lambda weight, indices, **kw: MF.embedding(indices, weight, **kw),
}

# Inputs torch accepts and manual_grad refuses on purpose (README, "Refusals"): a pattern
# of the refusal's message, and the reason. A sample whose refusal matches none is a bug.
# (None of torch's samples meets one today; test_documented_refusals keeps the list real.)
DOCUMENTED_REFUSALS = {
    "a loss whose target broadcasts to another shape": r"would broadcast|do not match|differ",
    "a loss whose float target has another dtype": r"convert the target",
    "Embedding(sparse=True)": r"sparse=True is not supported",
    "LeakyReLU in place with a negative slope": r"inplace=True needs negative_slope >= 0",
}

# what a refusal raises, in torch and here (an AttributeError, say, would be a bug)
REFUSALS = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)

OPS = [op for op in common_methods.op_db if op.name in FUNCTIONS]
MODULES = [m for m in common_modules.module_db if m.module_cls in COUNTERPARTS]


def _id(info) -> str:
    name = getattr(info, "name", None) or info.module_cls.__name__
    variant = getattr(info, "variant_test_name", "")
    return f"{name}.{variant}" if variant else name


def _clone(tree):
    """A leaf copy of every tensor in tree, requiring grad where the original did."""
    def leaf(t):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        return c.requires_grad_(t.requires_grad)
    return tree_map(leaf, tree)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _documented(error: Exception) -> bool:
    return any(re.search(p, str(error)) for p in DOCUMENTED_REFUSALS.values())


def _run(fn, inputs, params, gs=None):
    """fn on inputs: its tensor outputs, the gradients (for gs, random when None) of the
    inputs that require grad and of params, and the gs used."""
    outs = _tensors(fn(inputs))
    diff = [t for t in outs if t.requires_grad]
    leaves = [t for t in _tensors(inputs) if t.requires_grad] + list(params)
    if gs is None:
        gs = [torch.randn_like(t) for t in diff]
    grads = torch.autograd.grad(diff, leaves, gs, allow_unused=True) if diff else []
    return outs, [t.requires_grad for t in outs], list(grads), gs


def _as_float64(tree):
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor)
                    and t.dtype == torch.float32 else t, tree)


def _close_or_closer(name, what, ours, theirs, exact):
    """ours equals torch's; in float32, where it does not, ours must be as accurate as
    float32 allows: equal to the float64 result (exact) at float32's tolerances, the
    absolute one taken relative to the tensor's largest value (a gradient of 50 carries
    rounding of 50's size into its small elements), or no further from it than twice
    torch's own distance. Two float32 computations of one formula round differently
    element by element, and a formula more exact than torch's (a normalisation of one
    element, exactly 0 here and 3e-5 in torch) is not a bug."""
    try:
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    except AssertionError as error:
        if exact is None or ours.dtype != torch.float32:
            raise AssertionError(f"{name}: {what}: {error}") from None
        exact = exact.to(torch.float64)
        scale = max(exact.abs().nan_to_num().max().item(), 1.0)
        try:
            torch.testing.assert_close(ours.double(), exact, rtol=1.3e-6, atol=1e-5 * scale,
                                       equal_nan=True)
            return
        except AssertionError:
            pass
        ours_error = (ours.double() - exact).abs().nan_to_num().max()
        torch_error = (theirs.double() - exact).abs().nan_to_num().max()
        assert ours_error <= 2 * torch_error + 1e-7, (
            f"{name}: {what}: further from float64 ({ours_error:.3g}) than torch's "
            f"({torch_error:.3g}): {error}")


def _compare(name, ours_fn, theirs_fn, inputs, params=((), ()), theirs64=None) -> None:
    """Run both on copies of inputs; compare outputs and every gradient. theirs64, when
    given, is torch's computation in float64 (a float32 tie-breaker, see above)."""
    a, b = _clone(inputs), _clone(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = _run(theirs_fn, b, params[1])
        except Exception:  # torch refuses: so must we
            with pytest.raises(REFUSALS):
                ours_fn(a)
            return
        try:
            got = _run(ours_fn, a, params[0], expected[3])
        except Exception as error:
            if _documented(error):
                return
            raise AssertionError(
                f"{name}: torch runs it, manual_grad raised {error!r}") from error
        exact = None
        if theirs64 is not None:
            exact = _run(theirs64, _as_float64(_clone(inputs)), (), [g.double() for g in
                                                                   expected[3]])
    (outs_a, req_a, grads_a, _), (outs_b, req_b, grads_b, _) = got, expected
    assert len(outs_a) == len(outs_b), name
    assert req_a == req_b, f"{name}: outputs that require grad differ"
    for i, (x, y) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape,
                                                           y.shape)
        _close_or_closer(name, f"output {i}", x, y, exact and exact[0][i])
    for i, (x, y) in enumerate(zip(grads_a, grads_b, strict=True)):
        if y is None or x is None:  # unused: None on one side, zeros on the other
            assert (x is None or not x.any()) and (y is None or not y.any()), (name, i)
            continue
        _close_or_closer(name, f"gradient {i}", x, y, exact and exact[2][i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=_id)
def test_torch_sample_inputs_give_torchs_values_and_gradients(op, dtype):
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip(f"torch's {op.name} does not take {dtype} on the CPU")
    ours = FUNCTIONS[op.name]
    n = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        if sample.kwargs.get("dropout_p", 0) or sample.kwargs.get("training") and \
                op.name == "nn.functional.dropout":
            continue  # random draws differ from torch's: tests/test_attention.py checks
            # attention's dropout against its formula with the mask it drew
        inputs = (sample.input, sample.args, sample.kwargs)
        _compare(f"{_id(op)}[{sample.summary() if hasattr(sample, 'summary') else n}]",
                 lambda t, f=ours: f(t[0], *t[1], **t[2]),
                 lambda t, f=op.op: f(t[0], *t[1], **t[2]), inputs,
                 theirs64=lambda t, f=op.op: f(t[0], *t[1], **t[2]))
        n += 1
    assert n, "torch gave no samples"


@pytest.mark.parametrize("op", OPS, ids=_id)
def test_inputs_torch_refuses_are_refused(op):
    if op.error_inputs_func is None:
        pytest.skip("torch lists no inputs it refuses")
    for e in op.error_inputs("cpu"):
        s = e.sample_input
        with pytest.raises(REFUSALS):
            FUNCTIONS[op.name](s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("info", MODULES, ids=_id)
def test_torch_module_samples_give_torchs_values_gradients_and_buffers(info, dtype, training):
    if dtype not in info.dtypes:
        pytest.skip(f"torch's {info.module_cls.__name__} does not take {dtype}")
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training)
    for n, sample in enumerate(samples):
        if sample.forward_input is None:
            continue
        c = sample.constructor_input
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = info.module_cls(*c.args, **c.kwargs).to(dtype).train(training)
        ours = copy.deepcopy(theirs)
        converted = manual_grad.convert(ours, inplace=True)
        name = f"{_id(info)}[{n}: {sample.desc or c.kwargs}]"
        if ours.__class__ is type(theirs):
            # kept by convert: the report says why, and the layer itself refuses
            assert converted.kept, name
            continue
        f = sample.forward_input
        params_a = [p for p in ours.parameters() if p.requires_grad]
        params_b = [p for p in theirs.parameters() if p.requires_grad]
        _compare(name, lambda t, m=ours: m(*t[0], **t[1]),
                 lambda t, m=theirs: m(*t[0], **t[1]), (f.args, f.kwargs),
                 (params_a, params_b))
        for (key, x), y in zip(ours.state_dict().items(), theirs.state_dict().values(),
                               strict=True):
            torch.testing.assert_close(x, y, equal_nan=True, msg=f"{name}: {key}")


def test_documented_refusals_are_refusals_torch_does_not_make():
    """Each documented refusal (README, "Refusals") is met by a call torch runs (or, for
    LeakyReLU, refuses only later, in backward) and manual_grad refuses up front."""
    import torch.nn.functional as TF
    x = torch.randn(4, 1, requires_grad=True)
    calls = {
        "a loss whose target broadcasts to another shape": (
            lambda: TF.l1_loss(x, torch.randn(4)), lambda: MF.l1_loss(x, torch.randn(4))),
        "a loss whose float target has another dtype": (
            lambda: TF.mse_loss(x, torch.randn(4, 1, dtype=torch.float64)),
            lambda: MF.mse_loss(x, torch.randn(4, 1, dtype=torch.float64))),
        "Embedding(sparse=True)": (
            lambda: torch.nn.Embedding(3, 2, sparse=True)(torch.tensor([1])),
            lambda: manual_grad.Embedding(3, 2, sparse=True)(torch.tensor([1]))),
        "LeakyReLU in place with a negative slope": (
            lambda: TF.leaky_relu(x * 1, -0.1, inplace=True),
            lambda: MF.leaky_relu(x * 1, -0.1, inplace=True)),
    }
    assert calls.keys() == DOCUMENTED_REFUSALS.keys()
    for what, (theirs, ours) in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs()
        with pytest.raises(REFUSALS, match=DOCUMENTED_REFUSALS[what]):
            ours()
