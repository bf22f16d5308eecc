"""Forward-mode AD: every Function's hand-derived jvp, against finite differences
(gradcheck's forward-mode check) and against torch.nn's forward mode on the same models,
through every forward-mode tool torch has: torch.func.jvp, jacfwd, hessian,
torch.autograd.forward_ad dual tensors, vmap over jvp, forward-over-reverse, compile.
(The layer catalogue's gradcheck in test_library.py checks each layer's jvp too.)"""

import inspect

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad, gradcheck
from torch.func import functional_call, hessian, jacfwd, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import manual_grad
import manual_grad.functions as functions
from manual_grad import functional as MF

D = torch.float64


def all_functions() -> list[type]:
    """Every autograd.Function the package defines (its modules, not the eager twins)."""
    found = set()
    for module in (m for _, m in inspect.getmembers(functions, inspect.ismodule)):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, torch.autograd.Function) and cls.__module__.startswith(
                    "manual_grad") and "_eager_twin" in vars(cls):
                found.add(cls)
    return sorted(found, key=lambda c: c.__name__)


def test_every_function_has_a_hand_derived_jvp():
    """A new Function cannot miss one: each defines jvp itself, with its formula."""
    found = all_functions()
    assert len(found) >= 30
    for cls in found:
        assert "jvp" in vars(cls), f"{cls.__name__} has no jvp"
        assert "Forward mode" in (vars(cls)["jvp"].__doc__ or ""), cls.__name__
        assert cls._eager_twin.jvp is cls.jvp  # the eager path uses the same formula


def fd(f, *args, batched=True):
    return gradcheck(f, args, check_forward_ad=True, check_batched_forward_grad=batched)


def test_fused_blocks_and_single_pass_losses_jvp():
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=D), torch.randn(6, 3, dtype=D)
    W1, b1 = torch.randn(4, 5, dtype=D), torch.randn(4, dtype=D)
    W2, b2 = torch.randn(3, 4, dtype=D), torch.randn(3, dtype=D)
    args = [t.requires_grad_() for t in (x, W1, b1, W2, b2, y)]
    assert fd(MF.linear_relu, *args[:3])
    assert fd(MF.mlp, *args[:5])
    assert fd(lambda x, W, b, y: MF.linear_relu_mse_loss(x, W, b, y), x, W1, b1,
              torch.randn(6, 4, dtype=D, requires_grad=True))
    assert fd(lambda *t: MF.mlp_mse_loss(*t, reduction="sum"), *args)
    rows = torch.tensor([4, 0, 2])
    assert fd(lambda *t: MF.mlp_mse_loss(*t, rows=rows), *args[:5], y.detach())


def test_dropout_and_matmul_jvp():
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    for inplace in (False, True):
        def f(x, inplace=inplace):
            torch.manual_seed(0)  # the same mask on every call gradcheck makes
            return MF.dropout(x * 1, 0.4, inplace=inplace)
        assert fd(f, x, batched=False)  # (no random draw under torch's older vmap)
    a, b = (torch.randn(2, 3, 4, dtype=D, requires_grad=True),
            torch.randn(4, 5, dtype=D, requires_grad=True))
    assert fd(MF.matmul, a, b)


# ---- whole models against torch.nn's forward mode ---------------------------------------


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2))


def transformer():
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)


MODELS = {
    "mlp": (mlp, lambda: torch.randn(4, 6, dtype=D)),
    "cnn-batchnorm": (cnn, lambda: torch.randn(3, 2, 4, 4, dtype=D)),
    "transformer-block": (transformer, lambda: torch.randn(2, 3, 8, dtype=D)),
}


def pair(name):
    make, data = MODELS[name]
    torch.manual_seed(0)
    # eval: BatchNorm's running statistics as constants. The transformer block stays in
    # training mode (its dropout is 0): in eval torch.nn's layer takes a fused kernel that
    # has no forward mode
    theirs = make().double().train(name == "transformer-block")
    return manual_grad.convert(theirs).model, theirs, data()


@pytest.fixture(autouse=True)
def _math_attention():
    """torch's attention on its math backend: its CPU flash kernel has no forward mode."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def params_of(model):
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_jvp_and_jacfwd_equal_torch_nn(name):
    ours, theirs, x = pair(name)
    v = torch.randn_like(x)
    results = []
    for model in (ours, theirs):
        params = params_of(model)
        tangents = {k: torch.randn(p.shape, dtype=D, generator=torch.Generator().manual_seed(i))
                    for i, (k, p) in enumerate(params.items())}
        out, dout = jvp(lambda x, m=model: m(x), (x,), (v,))
        _, dparams = jvp(lambda p, m=model: functional_call(m, p, (x,)), (params,),
                         (tangents,))
        jac_x = jacfwd(lambda x, m=model: m(x))(x)
        jac_p = jacfwd(lambda p, m=model: functional_call(m, p, (x,)))(params)
        results.append((out, dout, dparams, jac_x, jac_p))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_equals_torch_nn(name):
    """torch.func.hessian is jacfwd over jacrev: forward mode through the backward."""
    ours, theirs, x = pair(name)
    hs = []
    for model in (ours, theirs):
        params = params_of(model)
        last = list(params)[-2]  # the last layer's weight: a Hessian block of a usable size

        def loss(w, model=model, params=params, last=last):
            return functional_call(model, {**params, last: w}, (x,)).square().sum()

        hs.append((hessian(loss)(params[last]),
                   hessian(lambda x, m=model: m(x).square().sum())(x)))
    torch.testing.assert_close(hs[0], hs[1])


def test_dual_tensors_vmap_over_jvp_and_compiled_jvp():
    ours, theirs, x = pair("cnn-batchnorm")
    v = torch.randn_like(x)
    duals = []
    for model in (ours, theirs):
        with forward_ad.dual_level():
            out = model(forward_ad.make_dual(x, v))
            duals.append(forward_ad.unpack_dual(out).tangent)
    torch.testing.assert_close(duals[0], duals[1])
    vs = torch.randn(5, *x.shape, dtype=D)
    batched = torch.func.vmap(lambda v: jvp(ours, (x,), (v,))[1])(vs)
    torch.testing.assert_close(batched, torch.stack([jvp(theirs, (x,), (t,))[1] for t in vs]))
    # compiled: torch.nn's values, each Function run eagerly by its own jvp between the
    # graphs. One graph (fullgraph=True) is not to be had on torch 2.14: its tracer
    # refuses a Function that defines jvp (pytorch#180284); this fails once it can
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, v: jvp(ours, (x,), (v,)), backend="aot_eager")
    torch.testing.assert_close(compiled(x, v), jvp(theirs, (x,), (v,)))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="custom jvp"):
        torch.compile(lambda x, v: jvp(ours, (x,), (v,)), fullgraph=True,
                      backend="aot_eager")(x, v)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_jvp_and_hvp_helpers_equal_torch_nn(name):
    ours, theirs, x = pair(name)
    with torch.no_grad():
        target = theirs(x) + 0.1

    def loss_fn(out, target):
        return ((out - target) ** 2).mean()

    vector = {k: torch.randn(p.shape, dtype=D, generator=torch.Generator().manual_seed(i))
              for i, (k, p) in enumerate(theirs.named_parameters())}
    got = (manual_grad.loss_jvp(ours, loss_fn, x, target, vector),
           manual_grad.loss_hvp(ours, loss_fn, x, target, vector))
    want = (manual_grad.loss_jvp(theirs, loss_fn, x, target, vector),
            manual_grad.loss_hvp(theirs, loss_fn, x, target, vector))
    torch.testing.assert_close(got, want)
    # and H v against the Hessian-free route of reverse over reverse
    params = params_of(theirs)
    flat = torch.autograd.functional.hvp(
        lambda *ps: loss_fn(functional_call(theirs, dict(zip(params, ps, strict=True)), (x,)),
                            target), tuple(params.values()), tuple(vector.values()))[1]
    torch.testing.assert_close(tuple(got[1].values()), flat)
