"""The formulas compiled into fused kernels (functions/_fuse.py) give what the eager ones
and torch.nn give, forward and backward, and the choice between them is made at run time
and kept per device, dtype and thread count."""

import copy

import pytest
import torch
from torch import nn

import manual_grad
from manual_grad.functions import _fuse, activations, normalization

BIG = (16, 64, 256)  # 262,144 elements: above _fuse.MIN_ELEMENTS

LAYERS = {
    "GELU": (lambda: nn.GELU(), BIG, [activations._gelu, activations._gelu_grad]),
    "GELU-tanh": (lambda: nn.GELU(approximate="tanh"), BIG,
                  [activations._gelu, activations._gelu_grad]),
    "Softmax": (lambda: nn.Softmax(-1), BIG, [activations._softmax_grad]),
    "LogSoftmax": (lambda: nn.LogSoftmax(-1), BIG, [activations._log_softmax_grad]),
    "LayerNorm": (lambda: nn.LayerNorm(256), BIG,
                  [normalization._layer_norm_rows, normalization._layer_norm_grads]),
    "LayerNorm-2d-shape": (lambda: nn.LayerNorm((64, 256)), BIG,
                           [normalization._layer_norm_rows, normalization._layer_norm_grads]),
    "LayerNorm-no-affine": (lambda: nn.LayerNorm(256, elementwise_affine=False), BIG,
                            [normalization._layer_norm_grads]),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(16), (8, 16, 48, 48),
                    [normalization._batch_norm_train, normalization.batch_stats,
                     normalization._batch_norm_grads]),
    "GroupNorm": (lambda: nn.GroupNorm(4, 16), (8, 16, 48, 48),
                  [normalization._group_norm_grads]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_formulas_match_torch_and_the_eager_ones(name, dtype, monkeypatch):
    make, shape, formulas = LAYERS[name]
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
    for f in formulas:  # the compiled forms ran
        assert f.choices.get(("cpu", dtype, torch.get_num_threads())) is True, f
    # float64: the same numbers to rounding; float32: to its precision relative to the
    # tensor's largest value (sums over 4,096 rows round differently in any order)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b, c in zip(results["always"], results["never"], results["torch"], strict=True):
        for other in (b, c):
            torch.testing.assert_close(a, other, rtol=tol, atol=tol * other.abs().max())


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
        key = ("cpu", torch.float32, torch.get_num_threads())
        eager_won = not f.choices[key]
        assert calls["eager"] == 3 + eager_won  # timed three times, then the call itself
        f(z)
        f(z)
        assert list(f.choices) == [key]  # decided once for the key
        assert calls["eager"] == 3 + 3 * eager_won


def test_a_formula_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fuse, "MODE", "always")

    def formula(z):
        return torch.tensor(z.tolist()).sum() + z  # data-dependent: fullgraph refuses it

    f = _fuse.Fusable(formula)
    z = torch.randn(_fuse.MIN_ELEMENTS)
    with torch.no_grad(), pytest.warns(UserWarning, match="compiling formula failed"):
        out = f(z)
    torch.testing.assert_close(out, formula(z))
    assert f.failed and not f.applies(z)
