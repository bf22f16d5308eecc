"""The formulas compiled into fused kernels (functions/_fuse.py) give what the eager ones
and torch.nn give, forward and backward, and the choice between them is made at run time
and kept per device, dtype, thread count and shape (past a formula's first shapes, per
size to a power of two)."""

import copy
import math

import pytest
import torch
from torch import nn

import manual_grad
from manual_grad.functions import _fuse, activations, conv, losses, normalization

BIG = (16, 64, 256)  # 262,144 elements: above _fuse.MIN_ELEMENTS and conv._MEASURED

LAYERS = {
    "GELU": (lambda: nn.GELU(), BIG, [activations._gelu_grad]),
    "GELU-tanh": (lambda: nn.GELU(approximate="tanh"), BIG,
                  [activations._gelu_grad]),
    "Softmax": (lambda: nn.Softmax(-1), BIG, [activations._softmax_grad]),
    "LogSoftmax": (lambda: nn.LogSoftmax(-1), BIG, [activations._log_softmax_grad]),
    "LayerNorm": (lambda: nn.LayerNorm(256), BIG,
                  [normalization._layer_norm_rows, normalization._layer_norm_grads]),
    "LayerNorm-2d-shape": (lambda: nn.LayerNorm((64, 256)), BIG,
                           [normalization._layer_norm_rows, normalization._layer_norm_grads]),
    "LayerNorm-no-affine": (lambda: nn.LayerNorm(256, elementwise_affine=False), BIG,
                            [normalization._layer_norm_grads]),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(16), (8, 16, 48, 48),
                    [normalization._batch_norm_train, normalization._batch_norm_grads]),
    "GroupNorm": (lambda: nn.GroupNorm(4, 16), (8, 16, 48, 48),
                  [normalization._group_norm, normalization._group_norm_grads]),
    "GroupNorm-no-affine": (lambda: nn.GroupNorm(4, 16, affine=False), (8, 16, 48, 48),
                            [normalization._group_norm, normalization._group_norm_grads]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_formulas_match_torch_and_the_eager_ones(name, dtype, monkeypatch):
    make, shape, formulas = LAYERS[name]
    for f in formulas:  # (this test's choices only: the assertion below is about them)
        monkeypatch.setattr(f, "choices", {})
    torch.manual_seed(0)
    theirs = make().to(dtype)
    ours = manual_grad.convert(theirs).model
    x = torch.randn(shape, dtype=dtype)
    g = torch.randn(shape, dtype=dtype)
    results = {}
    for mode in ("never", "always", "torch"):
        monkeypatch.setattr(_fuse, "MODE", "never" if mode == "torch" else mode)
        layer = copy.deepcopy(theirs if mode == "torch" else ours)  # the same buffers each
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(g)
        results[mode] = [out.detach(), xi.grad, *(p.grad.clone() for p in layer.parameters()),
                         *(b for b in layer.buffers() if b.is_floating_point())]
    for f in formulas:  # the compiled forms ran, for this dtype
        assert [k[1] for k in f.choices] == [dtype] and f.eager not in f.choices.values(), f
    # float64: the same numbers to rounding; float32: to its precision relative to the
    # tensor's largest value (sums over 4,096 rows round differently in any order)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b, c in zip(results["always"], results["never"], results["torch"], strict=True):
        for other in (b, c):
            torch.testing.assert_close(a, other, rtol=tol, atol=tol * other.abs().max())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(64, 1000), (8, 10, 24, 24)])
def test_compiled_cross_entropy_gradient_matches_torch_and_the_scatter(shape, reduction,
                                                                        monkeypatch):
    """Cross-entropy's gradient for class indices (losses._index_grad), compiled with its
    one-hot as a comparison, against the eager scatter form and torch.nn, with ignored
    samples, for each reduction and with spatial dims; float64."""
    torch.manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    t.view(-1)[::7] = -100  # ignored
    monkeypatch.setattr(losses._index_grad, "choices", {})  # (this test's alone)
    grads = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(_fuse, "MODE", mode)
        zi = z.clone().requires_grad_()
        out = manual_grad.CrossEntropyLoss(reduction=reduction)(zi, t)
        out.backward(torch.ones_like(out) * 0.5)
        grads[mode] = zi.grad
    zt = z.clone().requires_grad_()
    out = nn.CrossEntropyLoss(reduction=reduction)(zt, t)
    out.backward(torch.ones_like(out) * 0.5)
    runs = losses._index_grad.choices.values()
    assert runs and losses._index_grad.eager not in runs  # the compiled form ran
    torch.testing.assert_close(grads["always"], grads["never"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["always"], zt.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_compiled_group_and_batch_norm_take_every_affine_option_and_layout(affine,
                                                                          channels_last,
                                                                          monkeypatch):
    """GroupNorm's compiled x s + t forward and sums backward, and BatchNorm's compiled
    formulas, with a weight alone, a bias alone or neither (functional calls take them
    apart; the modules only both or none) and on channels-last inputs, whose strides
    are a signature of their own: against torch.nn.functional in float64."""
    monkeypatch.setattr(_fuse, "MODE", "always")
    formulas = (normalization._group_norm, normalization._group_norm_grads,
                normalization._batch_norm_train, normalization._batch_norm_grads)
    for f in formulas:  # (this test's choices only)
        monkeypatch.setattr(f, "choices", {})
    torch.manual_seed(0)
    x = torch.randn(4, 16, 40, 40, dtype=torch.float64)  # 102,400 values
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, dtype=torch.float64) if affine in ("both", "weight") else None
    b = torch.randn(16, dtype=torch.float64) if affine in ("both", "bias") else None
    g = torch.cos(torch.arange(x.numel(), dtype=torch.float64)).view(x.shape)
    for ours, theirs in ((lambda t, w, b: manual_grad.functional.group_norm(t, 4, w, b),
                          lambda t, w, b: nn.functional.group_norm(t, 4, w, b)),
                         (lambda t, w, b: manual_grad.functional.batch_norm(
                             t, None, None, w, b, training=True),
                          lambda t, w, b: nn.functional.batch_norm(
                              t, None, None, w, b, training=True))):
        got, want = [], []
        for f, out in ((ours, got), (theirs, want)):
            leaves = [a.clone().requires_grad_() for a in (x, w, b) if a is not None]
            it = iter(leaves)
            args = [next(it) if a is not None else None for a in (x, w, b)]
            y = f(*args)
            y.backward(g)
            out += [y, *(a.grad for a in leaves)]
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    for f in formulas:  # compiled, not given up
        assert f.choices and f.eager not in f.choices.values() and not f.failed, f


def test_small_tensors_double_backward_and_tracing_keep_the_eager_formula(monkeypatch):
    monkeypatch.setattr(_fuse, "MODE", "always")
    f = _fuse.Fusable(lambda z: z * 2)
    small, big = torch.randn(8), torch.randn(_fuse.MIN_ELEMENTS)
    with torch.no_grad():  # as in a Function's forward, and a plain backward
        assert not f.applies(small)  # below MIN_ELEMENTS
        assert f.applies(big)
        assert not f.applies(big.to("meta"))
        seen = []
        torch.func.vmap(lambda t: seen.append(f.applies(big)) or t)(torch.ones(2))
        assert seen == [False]  # a torch.func transform traces it
    assert not f.applies(big)  # grad mode on: a graph of the backward is wanted


def test_auto_measures_once_per_key_and_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(_fuse, "MODE", "auto")
    calls = {"eager": 0}

    def eager(z):
        calls["eager"] += 1
        return z + 1

    f = _fuse.Fusable(lambda z: z + 1, eager=eager)
    with torch.no_grad():
        z = torch.randn(_fuse.MIN_ELEMENTS)
        torch.testing.assert_close(f(z), z + 1)
        key = ("cpu", torch.float32, torch.get_num_threads(), z.shape)
        eager_won = f.choices[key] is eager
        assert calls["eager"] == 3 + eager_won  # timed three times, then the call itself
        f(z)
        f(z)
        assert list(f.choices) == [key]  # decided once for the key
        assert calls["eager"] == 3 + 3 * eager_won
        f(torch.randn(4 * _fuse.MIN_ELEMENTS))  # another size: measured again, for it
        assert len(f.choices) == 2


def test_a_formula_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fuse, "MODE", "always")

    def formula(z):
        # reads a value: compiling refuses it, rather than keep the value it saw
        return z * float(z.sum())

    f = _fuse.Fusable(formula)
    z = torch.randn(_fuse.MIN_ELEMENTS)
    with torch.no_grad(), pytest.warns(UserWarning, match="compiling formula failed"):
        out = f(z)
    torch.testing.assert_close(out, formula(z))
    assert f.failed and not f.applies(z)


def test_faster_measures_once_per_key_and_follows_the_mode(monkeypatch):
    calls = {"plain": 0, "variant": 0, "other": 0}

    def form(name, fn):
        def run(z):
            calls[name] += 1
            return fn(z)
        return run

    forms = (form("plain", lambda z: z * 2), form("variant", lambda z: z + z),
             form("other", lambda z: torch.mul(z, 2)))
    z, choices = torch.randn(1000), {}
    monkeypatch.setattr(_fuse, "MODE", "auto")
    chosen = _fuse.faster(choices, ("k",), forms, (z,))
    assert calls == {"plain": 4, "variant": 4, "other": 4}  # a warm-up, three timed turns
    assert chosen is forms[choices[("k",)]]
    assert _fuse.faster(choices, ("k",), forms, (z,)) is chosen
    assert calls == {"plain": 4, "variant": 4, "other": 4}  # decided once for the key
    monkeypatch.setattr(_fuse, "MODE", "never")
    assert _fuse.faster({}, ("k",), forms, (z,)) is forms[0]
    monkeypatch.setattr(_fuse, "MODE", "always")
    assert _fuse.faster({}, ("k",), forms, (z,)) is forms[1]
    seen = []
    torch.func.vmap(lambda t: seen.append(_fuse.faster({}, ("k",), forms, (z,)))
                    or t)(torch.ones(2))
    assert seen == [forms[0]]  # traced: the plain form


CONVS = {  # (in channels, out, kernel, stride, padding, dilation, groups), input (N, H, W)
    "3x3": ((16, 24, 3, 1, 1, 1, 1), (4, 48, 48)),
    "1x1": ((16, 32, 1, 1, 0, 1, 1), (4, 48, 48)),
    "1x1 stride 2": ((16, 32, 1, 2, 0, 1, 1), (4, 48, 48)),
    "1x1 stride 2 odd size": ((16, 32, 1, 2, 0, 1, 1), (4, 49, 47)),
    "7x7 stride 2 pad 3": ((3, 16, 7, 2, 3, 1, 1), (8, 96, 96)),
    "dilated grouped": ((16, 16, 3, 1, 2, 2, 4), (4, 48, 48)),
    "depthwise stride 2 odd size": ((16, 16, 3, 2, 1, 1, 16), (4, 49, 47)),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["always", "auto"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_layouts_give_torchs_gradients(name, mode, channels_last, monkeypatch):
    """Conv2d's gradients taken channels-last (conv._*_channels_last), forced or chosen by
    measurement, against torch.nn's in float64, for the options that change the shapes."""
    (c, o, k, s, p, d, groups), (n, h, w) = CONVS[name]
    monkeypatch.setattr(_fuse, "MODE", mode)
    monkeypatch.setattr(conv, "_layout_choices", {})
    monkeypatch.setattr(conv, "_input_layout_choices", {})
    torch.manual_seed(0)
    theirs = nn.Conv2d(c, o, k, s, p, d, groups).double()
    ours = manual_grad.convert(copy.deepcopy(theirs)).model
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() >= conv._MEASURED  # big enough for the layouts to be weighed
    grads = []
    for layer in (theirs, ours):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.cos(out.detach()))
        grads.append([out, xi.grad, layer.weight.grad, layer.bias.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert grads[1][1].stride() == grads[0][1].stride()  # dL/dx in torch's layout
    assert len(conv._layout_choices) == len(conv._input_layout_choices) == int(mode == "auto")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("name", list(CONVS))
def test_every_weight_gradient_form_gives_torchs(name, dtype, channels_last, monkeypatch):
    """Each form conv.backward may measure and keep for these options, called directly:
    dL/dW against torch.nn's. The columns' form also in blocks of fewer samples than
    the batch (its last block short), and from an x that is a view into a larger one."""
    (c, o, k, s, p, d, groups), (n, h, w) = CONVS[name]
    torch.manual_seed(0)
    layer = nn.Conv2d(c, o, k, s, p, d, groups, bias=False).to(dtype)
    x = torch.randn(n + 1, c, h, w, dtype=dtype)[1:]  # (storage offset: not 0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = layer(x)
    g = torch.cos(out.detach())
    out.backward(g)
    forms = [conv._weight_grad, conv._weight_grad_channels_last]
    forms += [conv._weight_grad_columns] if groups == 1 else []
    forms += [conv._weight_grad_1x1] if (k, groups, p) == (1, 1, 0) else []
    for block in (conv._COLUMNS_BLOCK, c * k * k * (h // s) * (w // s) * 3 // 2):
        monkeypatch.setattr(conv, "_COLUMNS_BLOCK", block)
        for form in forms:
            got = form(x, g, (s, s), (p, p), (d, d), groups, k, k)
            torch.testing.assert_close(got, layer.weight.grad, rtol=1e-10, atol=1e-10)


def test_compiled_norms_take_every_layer_width_without_recompiling(monkeypatch):
    """A model's BatchNorms come in many widths (efficientnet_b0: 16). Dynamo takes a
    parameter's shape as fixed, so the compiled formula once recompiled for each width
    and, past its recompile limit (8), raised under fullgraph: converted efficientnets,
    mobilenets and densenets stopped in their first forward. Fourteen widths here, each
    against torch.nn; the formulas stay compiled."""
    monkeypatch.setattr(_fuse, "MODE", "always")
    monkeypatch.setattr(_fuse, "STATIC_SHAPES", 2)  # then one compile for every size
    torch.manual_seed(0)
    for c in [3, 5, 6, 7, 10, 12, 14, 20, 24, 28, 40, 48, 56, 80]:
        theirs = nn.BatchNorm2d(c).double()
        ours = manual_grad.convert(theirs).model
        x = torch.randn(-(-2 ** 15 // c), c, 2, 2, dtype=torch.float64)  # >= 2**17 values
        outs = []
        for layer in (theirs, ours):
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.backward(torch.cos(out.detach()))
            outs.append((out, xi.grad, layer.weight.grad, layer.running_var))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for f in (normalization._batch_norm_train, normalization._batch_norm_grads):
        assert not f.failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_each_shape_is_compiled_as_static_code_until_the_limit_then_by_size(dtype,
                                                                            monkeypatch):
    """The first STATIC_SHAPES shapes each get their own static compile (inductor's code
    for symbolic sizes is slower): on the CPU for real dtypes inductor's, from the traced
    graph (no Dynamo), else torch.compile's, each in a copy of the formula's code, so
    that Dynamo's per-code recompile limit is never reached. Later shapes share one
    compile with symbolic sizes, chosen per size to a power of two, however many come."""
    monkeypatch.setattr(_fuse, "MODE", "always")
    monkeypatch.setattr(_fuse, "STATIC_SHAPES", 3)
    f = _fuse.Fusable(lambda z: z * 2 + 1)
    n = _fuse.MIN_ELEMENTS
    shapes = [(n,), (2, n), (3, n), (4, n), (5, n), (n, 6)]
    with torch.no_grad():
        for shape in shapes + shapes[:2]:  # the first two again: their own code
            z = torch.randn(shape, dtype=dtype)
            torch.testing.assert_close(f(z), z * 2 + 1)
    assert list(f.static) == [("cpu", dtype, torch.Size(s)) for s in shapes[:3]]
    if dtype.is_complex:  # torch.compile's, a code object each (counted by identity)
        codes = {id(run._torchdynamo_orig_callable.__code__) for run in f.static.values()}
        assert len(codes) == 3
    else:  # inductor's, once per signature of the arguments
        assert all(type(run) is _fuse._PerSignature and len(run.runs) == 1
                   for run in f.static.values())
    assert f.compiled is not None and not f.failed
    threads = torch.get_num_threads()
    assert set(f.choices) == {("cpu", dtype, threads, torch.Size(s)) for s in shapes[:3]} | {
        ("cpu", dtype, threads, math.prod(s).bit_length()) for s in shapes[3:]}
    assert set(f.choices.values()) == {*f.static.values(), f.compiled}


def test_inductors_compiles_are_kept_per_signature_of_the_arguments(monkeypatch):
    """What Dynamo's guards would check, a dictionary does: the same shape with other
    strides, another constant, another thread count or no tensor at all is compiled
    anew (each against the eager formula), and past RECOMPILES signatures the eager
    formula runs."""
    monkeypatch.setattr(_fuse._PerSignature, "RECOMPILES", 5)

    def formula(z, w, c):
        return z * c + (w if w is not None else 0)

    run = _fuse._PerSignature(formula, formula)
    z = torch.randn(64, 32)
    w = torch.randn(32)
    threads = torch.get_num_threads()
    calls = [(z, w, 2.0), (z, w, 2.0), (z.t().contiguous().t(), w, 2.0), (z, w, 3.0),
             (z, None, 2.0), (z, torch.ones(1).expand(32), 2.0)]
    try:
        with torch.no_grad():
            for args in calls:
                torch.testing.assert_close(run(*args), formula(*args))
            torch.set_num_threads(1)
            torch.testing.assert_close(run(*calls[0]), formula(*calls[0]))
    finally:
        torch.set_num_threads(threads)
    assert len(run.runs) == 6  # five compiled, then (the sixth signature) the eager one
    assert list(run.runs.values()).count(formula) == 1
    assert list(run.runs.values())[-1] is formula


def test_a_formula_that_stops_compiling_later_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fuse, "MODE", "always")

    def formula(z):
        return z * 2

    f = _fuse.Fusable(formula)
    z = torch.randn(_fuse.MIN_ELEMENTS)
    with torch.no_grad():
        f(z)  # compiled
        calls = []

        def refuse(*args):
            calls.append(args)
            raise RuntimeError("recompile limit hit")

        f.choices = dict.fromkeys(f.choices, refuse)
        with pytest.warns(UserWarning, match="runs eagerly from now on"):
            out = f(z)
        torch.testing.assert_close(out, z * 2)
        assert f.failed and len(calls) == 1
        f(z)  # eager now, without trying again
        assert len(calls) == 1


def test_deterministic_algorithms_keep_the_plain_forms(monkeypatch):
    """torch.use_deterministic_algorithms(True) asks for runs that repeat bit for bit;
    a measured choice depends on timing, so "auto" keeps the plain forms ("always" is
    no choice, and holds)."""
    from manual_grad import functional
    monkeypatch.setattr(_fuse, "MODE", "auto")
    monkeypatch.setattr(functional, "SINGLE_PASS", "auto")
    f = _fuse.Fusable(lambda z: z * 2)
    z = torch.randn(_fuse.MIN_ELEMENTS)
    forms = (lambda t: t, lambda t: t.clone())
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            assert not f.applies(z)
            assert _fuse.faster({}, ("k",), forms, (z,)) is forms[0]
        assert not functional.single_pass_pays(("k",), None, None, ())  # nothing timed
        monkeypatch.setattr(_fuse, "MODE", "always")
        with torch.no_grad():
            assert f.applies(z)
            assert _fuse.faster({}, ("k",), forms, (z,)) is forms[1]
    finally:
        torch.use_deterministic_algorithms(before)


def test_nothing_is_timed_while_a_cuda_graph_is_captured(monkeypatch):
    """A synchronize is illegal inside a CUDA graph's capture: a key first met there runs
    the plain form and stays undecided (model.cuda_graph warms up before it captures, so
    its keys are decided by then)."""
    monkeypatch.setattr(_fuse, "MODE", "auto")
    monkeypatch.setattr(_fuse, "_capturing", lambda: True)
    forms = (lambda t: t, lambda t: t.clone())
    z, choices = torch.randn(_fuse.MIN_ELEMENTS), {}
    f = _fuse.Fusable(lambda t: t * 2, eager=lambda t: t * 2.0)
    with torch.no_grad():
        assert _fuse.faster(choices, ("k",), forms, (z,)) is forms[0]
        torch.testing.assert_close(f(z), z * 2)
    assert choices == {} and f.choices == {} and f.compiled is None and f.static == {}
