"""Every layer of the library against its two oracles: float64 gradcheck/gradgradcheck and
torch.nn itself (float32 and float64, non-contiguous inputs), plus state_dict interchange.

Each case names a layer and options; the test ids read as sentences, e.g.
``test_layer_matches_torch[Conv2d-stride2-pad1-groups2-float32]``.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import manual_grad


@dataclass
class Case:
    id: str
    layer: str  # the class name, in torch.nn and in manual_grad
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: Callable[[torch.dtype], list[torch.Tensor]] = lambda d: [torch.randn(4, 6, dtype=d)]
    grad_inputs: tuple[int, ...] = (0,)  # which inputs are differentiable
    train: bool = True
    gradcheck_params: bool = True
    # torch's older vmap, which batches tangents in gradcheck, refuses a Function whose
    # forward returns a view (Flatten): there torch.func.vmap over jvp is the check
    batched_forward_grad: bool = True

    def build(self, lib, dtype):
        module = getattr(lib, self.layer)(*self.args, **self.kwargs)
        if self.kwargs.get("inplace"):
            module = AfterAnOp(module)
        module = module.to(dtype)
        return module.train(self.train)


class AfterAnOp(nn.Module):
    """layer(2 x): an in-place layer overwrites a tensor, so the cases give it the result
    of an op rather than a leaf (which torch refuses to overwrite); the factor 2 also
    checks that the gradient reaches the input through that op."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * 2)


def away(t: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Move values off a kink at 0 by at least margin, so finite differences are exact."""
    return t + margin * t.sign() + margin * (t == 0)


def img(n=2, c=3, h=7, w=6):
    return lambda d: [torch.randn(n, c, h, w, dtype=d)]


def classes(c=5, extra=(), ignore=-100):
    def make(d):
        logits = torch.randn(6, c, *extra, dtype=d)
        target = torch.randint(0, c, (6, *extra))
        target.view(-1)[1] = ignore  # one ignored sample
        return [logits, target]
    return make


def probs(c=5):
    return lambda d: [torch.randn(6, c, dtype=d), torch.softmax(torch.randn(6, c, dtype=d), 1)]


def pair(shape=(5, 3), pos=False):
    def make(d):
        target = torch.rand(shape, dtype=d) if pos else torch.randn(shape, dtype=d)
        return [torch.randn(shape, dtype=d), target]
    return make


W5 = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7])

CASES = [
    Case("Linear", "Linear", (6, 3), inputs=lambda d: [torch.randn(2, 4, 6, dtype=d)]),
    Case("Linear-no-bias", "Linear", (6, 3), {"bias": False}),
    Case("ReLU", "ReLU", inputs=lambda d: [away(torch.randn(4, 6, dtype=d))]),
    Case("ReLU-inplace", "ReLU", kwargs={"inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d))]),
    Case("LeakyReLU", "LeakyReLU", inputs=lambda d: [away(torch.randn(4, 6, dtype=d))]),
    Case("LeakyReLU-slope0.2-inplace", "LeakyReLU", kwargs={"negative_slope": 0.2, "inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d))]),
    Case("LeakyReLU-slope0.2", "LeakyReLU", (0.2,),
         inputs=lambda d: [away(torch.randn(3, 2, 4, dtype=d))]),
    Case("Sigmoid", "Sigmoid"),
    Case("Tanh", "Tanh", inputs=lambda d: [torch.randn(2, 3, 4, dtype=d)]),
    Case("GELU-none", "GELU"),
    Case("GELU-tanh", "GELU", kwargs={"approximate": "tanh"}),
    Case("SiLU", "SiLU", inputs=lambda d: [torch.randn(7, dtype=d)]),
    Case("SiLU-inplace", "SiLU", kwargs={"inplace": True},
         inputs=lambda d: [torch.randn(3, 7, dtype=d)]),
    Case("Softmax-dim1", "Softmax", (1,)),
    Case("Softmax-dim0-3d", "Softmax", (0,), inputs=lambda d: [torch.randn(3, 2, 4, dtype=d)]),
    Case("LogSoftmax-dim-1", "LogSoftmax", (-1,), inputs=lambda d: [torch.randn(2, 3, 4, dtype=d)]),
    Case("CrossEntropyLoss", "CrossEntropyLoss", inputs=classes()),
    Case("CrossEntropyLoss-sum", "CrossEntropyLoss", kwargs={"reduction": "sum"},
         inputs=classes()),
    Case("CrossEntropyLoss-none-spatial", "CrossEntropyLoss", kwargs={"reduction": "none"},
         inputs=classes(extra=(2, 3))),
    Case("CrossEntropyLoss-weight-smoothing", "CrossEntropyLoss",
         kwargs={"weight": W5, "label_smoothing": 0.1}, inputs=classes()),
    Case("CrossEntropyLoss-ignore3-weight-mean", "CrossEntropyLoss",
         kwargs={"weight": W5, "ignore_index": 3}, inputs=classes(ignore=3)),
    Case("CrossEntropyLoss-unbatched", "CrossEntropyLoss",
         inputs=lambda d: [torch.randn(5, dtype=d), torch.tensor(2)]),
    Case("CrossEntropyLoss-probabilities", "CrossEntropyLoss", inputs=probs(),
         grad_inputs=(0, 1)),
    Case("CrossEntropyLoss-probabilities-weight-smoothing-none", "CrossEntropyLoss",
         kwargs={"weight": W5, "label_smoothing": 0.2, "reduction": "none"}, inputs=probs(),
         grad_inputs=(0, 1)),
    Case("BCEWithLogitsLoss", "BCEWithLogitsLoss", inputs=pair(pos=True), grad_inputs=(0, 1)),
    Case("BCEWithLogitsLoss-weights-none", "BCEWithLogitsLoss",
         kwargs={"weight": torch.rand(3), "pos_weight": torch.rand(3) * 3, "reduction": "none"},
         inputs=pair(pos=True), grad_inputs=(0, 1)),
    Case("L1Loss", "L1Loss", inputs=pair(), grad_inputs=(0, 1)),
    Case("L1Loss-sum", "L1Loss", kwargs={"reduction": "sum"}, inputs=pair(), grad_inputs=(0,)),
    Case("HuberLoss", "HuberLoss", inputs=pair(), grad_inputs=(0, 1)),
    Case("HuberLoss-delta0.5-none", "HuberLoss", kwargs={"delta": 0.5, "reduction": "none"},
         inputs=pair((2, 3, 2)), grad_inputs=(0, 1)),
    Case("LayerNorm", "LayerNorm", (6,)),
    Case("LayerNorm-2d-shape-no-bias", "LayerNorm", ((3, 4),), {"bias": False},
         inputs=lambda d: [torch.randn(2, 3, 4, dtype=d)]),
    Case("LayerNorm-no-affine", "LayerNorm", (6,), {"elementwise_affine": False}),
    Case("BatchNorm1d-train", "BatchNorm1d", (6,)),
    Case("BatchNorm1d-3d-momentum-None", "BatchNorm1d", (3,), {"momentum": None},
         inputs=lambda d: [torch.randn(4, 3, 5, dtype=d)]),
    Case("BatchNorm1d-eval", "BatchNorm1d", (6,), train=False),
    Case("BatchNorm2d-train", "BatchNorm2d", (3,), inputs=img()),
    Case("BatchNorm2d-eval", "BatchNorm2d", (3,), inputs=img(), train=False),
    Case("BatchNorm2d-no-affine", "BatchNorm2d", (3,), {"affine": False}, inputs=img()),
    Case("BatchNorm2d-no-running-stats-train", "BatchNorm2d", (3,),
         {"track_running_stats": False}, inputs=img()),
    Case("BatchNorm2d-no-running-stats-eval", "BatchNorm2d", (3,),
         {"track_running_stats": False}, inputs=img(), train=False),
    Case("Conv2d", "Conv2d", (3, 4, 3), inputs=img()),
    Case("Conv2d-stride2-pad1-groups3", "Conv2d", (3, 6, 3), {"stride": 2, "padding": 1,
                                                               "groups": 3}, inputs=img()),
    Case("Conv2d-dilation2-rect-no-bias", "Conv2d", (3, 2, (2, 3)),
         {"dilation": (2, 1), "padding": (1, 2), "bias": False}, inputs=img()),
    Case("Conv2d-same", "Conv2d", (3, 2, 4), {"padding": "same"}, inputs=img()),
    Case("Conv2d-reflect", "Conv2d", (3, 2, 3), {"padding": 1, "padding_mode": "reflect"},
         inputs=img()),
    Case("Conv2d-circular-stride2", "Conv2d", (3, 2, 3), {"padding": 1, "stride": 2,
                                                         "padding_mode": "circular"},
         inputs=img()),
    Case("Conv2d-unbatched", "Conv2d", (3, 2, 3), inputs=lambda d: [torch.randn(3, 5, 5,
                                                                               dtype=d)]),
    Case("MaxPool2d", "MaxPool2d", (2,), inputs=img()),
    Case("MaxPool2d-overlap-pad-ceil", "MaxPool2d", (3,), {"stride": 2, "padding": 1,
                                                           "ceil_mode": True}, inputs=img()),
    Case("MaxPool2d-dilation", "MaxPool2d", ((2, 3),), {"stride": 1, "dilation": (2, 1)},
         inputs=img()),
    Case("AvgPool2d", "AvgPool2d", (2,), inputs=img()),
    Case("AvgPool2d-pad-exclude", "AvgPool2d", (3,), {"stride": 2, "padding": 1,
                                                      "count_include_pad": False}, inputs=img()),
    Case("AvgPool2d-divisor", "AvgPool2d", ((2, 3),), {"stride": 1, "divisor_override": 4},
         inputs=img()),
    # windows that tile the image (stride = kernel), a row left over, a divisor given
    Case("AvgPool2d-tiles-divisor", "AvgPool2d", ((2, 3),), {"divisor_override": 5},
         inputs=img()),
    # ceil_mode: the last windows reach past the padded input (7 x 6 images)
    Case("AvgPool2d-ceil", "AvgPool2d", (3,), {"stride": 2, "ceil_mode": True}, inputs=img()),
    Case("AvgPool2d-ceil-pad-exclude", "AvgPool2d", (3,), {"stride": 2, "padding": 1,
                                                           "ceil_mode": True,
                                                           "count_include_pad": False},
         inputs=img()),
    Case("AvgPool2d-ceil-divisor", "AvgPool2d", ((2, 3),), {"stride": (3, 2), "ceil_mode": True,
                                                            "divisor_override": 4}, inputs=img()),
    Case("Hardswish", "Hardswish", inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 4)]),
    Case("Hardswish-inplace", "Hardswish", kwargs={"inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 4)]),
    Case("Hardtanh", "Hardtanh", inputs=lambda d: [away(torch.randn(4, 6, dtype=d))]),
    Case("Hardtanh-range-inplace", "Hardtanh", kwargs={"min_val": -0.5, "max_val": 2.0,
                                                       "inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 2)]),
    Case("ReLU6", "ReLU6", inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 5)]),
    Case("ReLU6-inplace", "ReLU6", kwargs={"inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 5)]),
    Case("Hardsigmoid", "Hardsigmoid", inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 4)]),
    Case("Hardsigmoid-inplace", "Hardsigmoid", kwargs={"inplace": True},
         inputs=lambda d: [away(torch.randn(4, 6, dtype=d) * 4)]),
    Case("AdaptiveAvgPool2d-1", "AdaptiveAvgPool2d", (1,), inputs=img()),
    Case("AdaptiveAvgPool2d-3x4", "AdaptiveAvgPool2d", ((3, 4),), inputs=img()),
    Case("AdaptiveAvgPool2d-None-2", "AdaptiveAvgPool2d", ((None, 2),), inputs=img()),
    Case("GroupNorm", "GroupNorm", (2, 4), inputs=lambda d: [torch.randn(3, 4, 5, dtype=d)]),
    Case("GroupNorm-img-no-affine", "GroupNorm", (3, 6), {"affine": False, "eps": 1e-3},
         inputs=lambda d: [torch.randn(2, 6, 3, 4, dtype=d)]),
    Case("RMSNorm", "RMSNorm", (6,)),
    Case("RMSNorm-2d-eps-no-affine", "RMSNorm", ((3, 4),),
         {"eps": 1e-3, "elementwise_affine": False},
         inputs=lambda d: [torch.randn(2, 3, 4, dtype=d)]),
    Case("Conv1d", "Conv1d", (3, 4, 3), inputs=lambda d: [torch.randn(2, 3, 9, dtype=d)]),
    Case("Conv1d-stride2-pad1-dilation2-groups3", "Conv1d", (3, 6, 3),
         {"stride": 2, "padding": 1, "dilation": 2, "groups": 3},
         inputs=lambda d: [torch.randn(2, 3, 11, dtype=d)]),
    Case("Conv1d-same-reflect-no-bias", "Conv1d", (3, 2, 4),
         {"padding": "same", "padding_mode": "reflect", "bias": False},
         inputs=lambda d: [torch.randn(2, 3, 9, dtype=d)]),
    Case("Flatten", "Flatten", inputs=img(), batched_forward_grad=False),
    Case("Flatten-1-2", "Flatten", (1, 2), inputs=img(), batched_forward_grad=False),
    Case("Embedding", "Embedding", (7, 4), inputs=lambda d: [torch.tensor([[1, 2, 1], [6, 0, 2]])],
         grad_inputs=()),
]
# by design (torch's too) not the derivative: the padding row gets no gradient, and
# scale_grad_by_freq divides by counts; so torch.nn is the only oracle for these
PARITY_ONLY = [
    Case("Embedding-padding", "Embedding", (7, 4), {"padding_idx": 2},
         inputs=lambda d: [torch.tensor([1, 2, 2, 5])], grad_inputs=()),
    Case("Embedding-scale-by-freq", "Embedding", (7, 4), {"scale_grad_by_freq": True},
         inputs=lambda d: [torch.tensor([[1, 2, 1], [6, 1, 2]])], grad_inputs=()),
]


def paired(case: Case, dtype: torch.dtype):
    torch.manual_seed(0)
    theirs = case.build(nn, dtype)
    ours = case.build(manual_grad, dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def with_grads(case: Case, tensors):
    return [t.detach().clone().requires_grad_(i in case.grad_inputs)
            for i, t in enumerate(tensors)]


def assert_gradchecks(case: Case, module: nn.Module, raw: list[torch.Tensor]) -> None:
    """gradcheck and gradgradcheck of module in its parameters and case's grad inputs."""
    params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    names = list(params)

    def f(*args):
        ps = dict(zip(names, args[: len(names)], strict=True))
        return functional_call(module, ps, tuple(args[len(names):]))

    args = tuple(params.values()) + tuple(with_grads(case, raw))
    # reverse mode, and forward mode (each Function's jvp), batched under vmap too
    assert gradcheck(f, args, check_forward_ad=True,
                     check_batched_forward_grad=case.batched_forward_grad)
    assert gradgradcheck(f, args)


def assert_same_as_torch(case: Case, ours: nn.Module, theirs: nn.Module,
                         raw: list[torch.Tensor], **tol: float) -> None:
    """Outputs, and gradients of case's grad inputs and of every parameter, for one g."""
    a, b = with_grads(case, raw), with_grads(case, raw)
    ya, yb = ours(*a), theirs(*b)
    torch.testing.assert_close(ya, yb, **tol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    for i in case.grad_inputs:
        torch.testing.assert_close(a[i].grad, b[i].grad, **tol, msg=f"input {i}")
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **tol, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_gradcheck_and_gradgradcheck(case):
    torch.manual_seed(1)
    ours, _ = paired(case, torch.float64)
    assert_gradchecks(case, ours, case.inputs(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES + PARITY_ONLY, ids=lambda c: c.id)
def test_layer_matches_torch(case, dtype):
    torch.manual_seed(2)
    ours, theirs = paired(case, dtype)
    raw = case.inputs(dtype)
    # non-contiguous copies of the same values: transposed twice back to the same shape
    raw = [t.mT.contiguous().mT if t.dim() >= 2 and t.is_floating_point() else t for t in raw]
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_same_as_torch(case, ours, theirs, raw, **tol)
    for (name, b1), b2 in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b1, b2, **tol, msg=name)  # running statistics


@pytest.mark.parametrize("case", [c for c in CASES if c.layer in {
    "LayerNorm", "BatchNorm1d", "BatchNorm2d", "Conv2d", "Embedding"}], ids=lambda c: c.id)
def test_layer_state_dict_moves_both_ways(case):
    for src_lib, dst_lib in ((manual_grad, nn), (nn, manual_grad)):
        torch.manual_seed(3)
        src = case.build(src_lib, torch.float32)
        for p in src.parameters():
            p.data.normal_()
        dst = case.build(dst_lib, torch.float32)
        dst.load_state_dict(src.state_dict())
        assert list(dst.state_dict()) == list(src.state_dict())
        inputs = case.inputs(torch.float32)
        src.eval()
        dst.eval()
        torch.testing.assert_close(dst(*inputs), src(*inputs))


def test_modules_mirror_their_torch_nn_counterparts():
    for name in manual_grad.__all__:
        cls = getattr(manual_grad, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and \
                not name.startswith("Fused"):
            assert issubclass(cls, getattr(nn, name)), name


def test_same_seed_gives_the_same_initial_weights():
    for make in (lambda lib: lib.Conv2d(3, 8, 3), lambda lib: lib.BatchNorm2d(4),
                 lambda lib: lib.LayerNorm(5), lambda lib: lib.Embedding(9, 3)):
        torch.manual_seed(4)
        a = make(manual_grad)
        torch.manual_seed(4)
        b = make(nn)
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
        assert repr(a) == repr(b)


def test_embedding_padding_row_gets_no_gradient():
    layer = manual_grad.Embedding(5, 3, padding_idx=0)
    layer(torch.tensor([0, 1, 0, 4])).sum().backward()
    assert torch.equal(layer.weight.grad[0], torch.zeros(3))
    assert torch.equal(layer.weight.grad[1], torch.ones(3))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_compiles_fullgraph_like_eager(case):
    torch._dynamo.reset()
    torch.manual_seed(5)
    ours, _ = paired(case, torch.float64)
    raw = case.inputs(torch.float64)
    a, b = with_grads(case, raw), with_grads(case, raw)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    yc = compiled(*a)
    grads_c = torch.autograd.grad(yc.sum(), [a[i] for i in case.grad_inputs]
                                  + list(ours.parameters()))
    ours.load_state_dict(paired(case, torch.float64)[0].state_dict())  # undo running stats
    ye = ours(*b)
    grads_e = torch.autograd.grad(ye.sum(), [b[i] for i in case.grad_inputs]
                                  + list(ours.parameters()))
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(grads_c, grads_e)


@pytest.mark.parametrize("case", [c for c in CASES if not (c.layer.startswith("BatchNorm")
                                                           and c.train)], ids=lambda c: c.id)
def test_layer_under_vmap_matches_torch(case):
    # BatchNorm in training updates running statistics in place, which vmap refuses for
    # torch.nn as well (see torch.func.replace_all_batch_norm_modules_)
    torch.manual_seed(6)
    ours, theirs = paired(case, torch.float64)
    stacked = [torch.stack([t, t.flip(0) if t.dim() else t]) for t in
               case.inputs(torch.float64)]
    # the oracle is a Python loop over torch.nn (some torch.nn losses refuse vmap)
    expected = torch.stack([theirs(*(t[i] for t in stacked)) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(ours)(*stacked), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES + PARITY_ONLY, ids=lambda c: c.id)
def test_layer_matches_torch_on_cuda(case):
    torch.manual_seed(7)
    ours, theirs = (m.cuda() for m in paired(case, torch.float64))
    assert_same_as_torch(case, ours, theirs, [t.cuda() for t in case.inputs(torch.float64)])


@pytest.mark.parametrize("case", [c for c in CASES if c.grad_inputs and not (
    c.layer.startswith("BatchNorm") and c.train)], ids=lambda c: c.id)
def test_layer_grad_jacrev_and_vjp_match_torch(case):
    # (BatchNorm in training mutates running statistics, which torch.func refuses for
    # torch.nn too; its training backward is covered by gradcheck and parity above)
    torch.manual_seed(8)
    ours, theirs = paired(case, torch.float64)
    inputs = case.inputs(torch.float64)
    i = case.grad_inputs[0]

    def as_fn(module):
        def f(x):
            args = list(inputs)
            args[i] = x
            return module(*args)
        return f

    x = inputs[i]
    torch.testing.assert_close(torch.func.jacrev(as_fn(ours))(x),
                               torch.func.jacrev(as_fn(theirs))(x))
    torch.testing.assert_close(torch.func.grad(lambda x: as_fn(ours)(x).sin().sum())(x),
                               torch.func.grad(lambda x: as_fn(theirs)(x).sin().sum())(x))
    out, pull = torch.func.vjp(as_fn(ours), x)
    ref_out, ref_pull = torch.func.vjp(as_fn(theirs), x)
    cot = torch.randn_like(out)
    torch.testing.assert_close(pull(cot), ref_pull(cot))


def empty_batch(case: Case, dtype: torch.dtype) -> list[torch.Tensor]:
    """The case's inputs with a batch of zero samples (the first dim)."""
    return [t[:0] if t.dim() else t for t in case.inputs(dtype)]


@pytest.mark.parametrize("case", [c for c in CASES if "unbatched" not in c.id],
                         ids=lambda c: c.id)
def test_layer_empty_batch_matches_torch(case):
    # (unbatched cases have no batch to empty; BatchNorm runs an empty batch, as torch)
    ours, theirs = paired(case, torch.float64)
    a, b = with_grads(case, empty_batch(case, torch.float64)), \
        with_grads(case, empty_batch(case, torch.float64))
    ya, yb = ours(*a), theirs(*b)
    torch.testing.assert_close(ya, yb, equal_nan=True)  # an empty mean is nan in torch too
    ya.sum().backward()
    yb.sum().backward()
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, equal_nan=True, msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c.layer in (
    "Conv2d", "BatchNorm2d", "MaxPool2d", "AvgPool2d") and c.inputs(torch.float32)[0].dim() == 4],
    ids=lambda c: c.id)
def test_layer_channels_last_matches_torch(case):
    ours, theirs = paired(case, torch.float32)
    x = case.inputs(torch.float32)[0].to(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), theirs(b)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ya).to(memory_format=torch.channels_last)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES + PARITY_ONLY, ids=lambda c: c.id)
def test_layer_runs_on_the_meta_device_like_torch(case):
    """Models are often built on the meta device (shapes, no memory) before their weights
    are loaded. Every layer runs forward and backward there as torch.nn's does, giving
    the same shapes and dtypes: no check reads values that meta tensors do not have."""
    results = []
    for lib in (nn, manual_grad):
        module = case.build(lib, torch.float32).to("meta")
        inputs = with_grads(case, [t.to("meta") for t in case.inputs(torch.float32)])
        try:
            out = module(*inputs)
        except RuntimeError:
            if lib is nn:  # e.g. BatchNorm's momentum=None reads a count: torch's too
                pytest.skip("torch.nn's layer does not run on meta tensors either")
            raise
        out.sum().backward()
        grads = [inputs[i].grad for i in case.grad_inputs] + [
            p.grad for p in module.parameters()]
        results.append([(t.shape, t.dtype, t.device.type) for t in (out, *grads)])
    assert results[1] == results[0]


def complex_inputs(case: Case) -> list[torch.Tensor]:
    """The case's inputs with a random imaginary part added to the float ones."""
    torch.manual_seed(3)
    return [torch.complex(t, torch.randn_like(t)) if t.is_floating_point() else t
            for t in case.inputs(torch.float64)]


# the layers torch.nn runs on complex tensors: for them torch's gradient is dL/d(conj z),
# so the hand-derived formulas take conjugates (of W and x in Linear/Conv2d, of the
# local derivative in Sigmoid/Tanh, and |d|'s sign is d/|d| in L1Loss)
COMPLEX = [c for c in CASES if c.layer in ("Linear", "Sigmoid", "Tanh", "Conv1d", "Conv2d",
                                         "L1Loss", "Flatten", "RMSNorm")
           or c.id == "AdaptiveAvgPool2d-1"]  # (torch's kernel: only a global mean)
# torch refuses to differentiate silu on complex tensors, but its in-place silu_ lets one
# through, with a gradient that is not torch's own dL/d(conj z) (finite differences
# disagree with it); for that case gradcheck is the oracle (test_complex_silu below)
TORCH_WRONG_ON_COMPLEX = ["SiLU-inplace"]


@pytest.mark.parametrize("case", COMPLEX, ids=lambda c: c.id)
def test_complex_layer_matches_torch_and_gradcheck(case):
    ours, theirs = (m.to(torch.complex128) for m in paired(case, torch.float64))
    raw = complex_inputs(case)
    assert_same_as_torch(case, ours, theirs, raw)
    # and the other oracle: finite differences of the complex function (Wirtinger)
    assert_gradchecks(case, ours, raw)


def test_the_complex_list_is_what_torch_runs():
    """COMPLEX above holds every case whose torch.nn layer runs forward and backward on
    complex tensors (so a layer that gains complex support in torch is not left
    untested here)."""
    runs = []
    for case in CASES:
        module = case.build(nn, torch.float64).to(torch.complex128)
        inputs = with_grads(case, complex_inputs(case))
        try:
            out = module(*inputs)
            out.backward(torch.randn_like(out))
        except (RuntimeError, NotImplementedError):
            continue
        runs.append(case.id)
    assert sorted(runs) == sorted([c.id for c in COMPLEX] + TORCH_WRONG_ON_COMPLEX)


def test_complex_silu_follows_finite_differences_where_torchs_silu_inplace_does_not():
    case = next(c for c in CASES if c.id == "SiLU-inplace")
    ours, theirs = (m.to(torch.complex128) for m in paired(case, torch.float64))
    raw = complex_inputs(case)
    assert_gradchecks(case, ours, raw)  # dL/d(conj z), as every other complex layer
    with pytest.raises(AssertionError):  # torch's silu_ gives another (g times the
        assert_same_as_torch(case, ours, theirs, raw)  # derivative, not its conjugate)


@pytest.mark.parametrize("case", CASES + PARITY_ONLY, ids=lambda c: c.id)
def test_layer_batched_grads_match_torch_and_a_loop(case):
    """autograd.grad(..., is_grads_batched=True), which jacobian(vectorize=True) uses,
    runs the backward under torch's older vmap: in-place, out= and some view ops are
    refused there. It must equal torch.nn's and one backward per incoming gradient."""
    ours, theirs = paired(case, torch.float64)
    raw = case.inputs(torch.float64)
    results = []
    for module in (ours, theirs):
        inputs = with_grads(case, raw)
        out = module(*inputs)
        torch.manual_seed(5)
        grads = torch.randn(3, *out.shape, dtype=out.dtype)
        wrt = [inputs[i] for i in case.grad_inputs] + list(module.parameters())
        batched = torch.autograd.grad(out, wrt, grads, is_grads_batched=True,
                                      retain_graph=True)
        looped = [torch.stack(gs) for gs in zip(*(
            torch.autograd.grad(out, wrt, g, retain_graph=True) for g in grads), strict=True)]
        for b, lp in zip(batched, looped, strict=True):
            torch.testing.assert_close(b, lp)
        results.append(batched)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_norm_functions_return_torchs_statistics_as_constants():
    """LayerNorm, GroupNorm and BatchNorm (training) return the statistics their backward
    reuses: torch's native ops' mean and 1/sqrt(var + eps) (BatchNorm: the biased var),
    outside the graph."""
    from manual_grad.functions import BatchNormFunction, GroupNormFunction, LayerNormFunction
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    _, mean, rstd = LayerNormFunction.apply(x, 2, w, b, 1e-5)
    _, t_mean, t_rstd = torch.native_layer_norm(x, (5, 3), w, b, 1e-5)
    torch.testing.assert_close((mean.view(4, 6, 1, 1), rstd.view(4, 6, 1, 1)), (t_mean, t_rstd))
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    _, mean, rstd = GroupNormFunction.apply(x, 3, w, b, 1e-5)
    _, t_mean, t_rstd = torch.native_group_norm(x, w, b, 4, 6, 15, 3, 1e-5)
    torch.testing.assert_close((mean.view(4, 3), rstd.view(4, 3)), (t_mean, t_rstd))
    _, mean, var = BatchNormFunction.apply(x, w, b, None, None, 1e-5)
    _, t_mean, t_invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close((mean, torch.rsqrt(var + 1e-5)), (t_mean, t_invstd))
    assert not (mean.requires_grad or var.requires_grad or rstd.requires_grad)
