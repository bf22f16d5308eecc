"""manual_grad under torch.compile and torch.func, and double backward, against torch.nn."""

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev, vjp, vmap

import manual_grad
from manual_grad import functional as MF

D = torch.float64


def models(d_in=6, hidden=5, seed=0):
    torch.manual_seed(seed)
    theirs = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 2)).to(D)
    ours = nn.Sequential(manual_grad.Linear(d_in, hidden), manual_grad.ReLU(),
                         manual_grad.Linear(hidden, 2)).to(D)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def grads_of(model, loss):
    return [p.grad.clone() for p in model.parameters()], loss.detach()


def train_grads(model, loss_fn, x, y, compiled=None):
    model.zero_grad()
    f = compiled or (lambda x, y: loss_fn(model(x), y))
    loss = f(x, y)
    loss.backward()
    return grads_of(model, loss)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward_equal_eager_and_native(backend):
    torch._dynamo.reset()
    ours, theirs = models()
    x, y = torch.randn(16, 6, dtype=D), torch.randn(16, 2, dtype=D)
    loss_fn = manual_grad.MSELoss()
    compiled = torch.compile(lambda x, y: loss_fn(ours(x), y), fullgraph=True, backend=backend)
    g_compiled, l_compiled = train_grads(ours, loss_fn, x, y, compiled)
    g_eager, l_eager = train_grads(ours, loss_fn, x, y)
    g_native, l_native = train_grads(theirs, nn.MSELoss(), x, y)
    torch.testing.assert_close(l_compiled, l_eager)
    torch.testing.assert_close(l_compiled, l_native)
    torch.testing.assert_close(g_compiled, g_eager)
    torch.testing.assert_close(g_compiled, g_native)


def test_compile_respects_which_gradients_are_needed():
    torch._dynamo.reset()
    W = torch.randn(3, 4, dtype=D, requires_grad=True)
    x = torch.randn(5, 4, dtype=D)  # an input that needs no gradient

    def f(x, W):
        return MF.linear(x, W).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (gW,) = torch.autograd.grad(compiled(x, W), W)
    torch.testing.assert_close(gW, torch.autograd.grad(f(x, W), W)[0])
    x.requires_grad_()
    gx, gW2 = torch.autograd.grad(compiled(x, W), (x, W))
    torch.testing.assert_close((gx, gW2), torch.autograd.grad(f(x, W), (x, W)))


FUNCTIONS = {
    "linear": (lambda x, W, b: MF.linear(x, W, b),
               lambda x, W, b: nn.functional.linear(x, W, b)),
    "relu": (lambda x, W, b: MF.relu(x), lambda x, W, b: torch.relu(x)),
    "mse": (lambda x, W, b: MF.mse_loss(x, torch.ones_like(x) * b.sum(), reduction="none"),
            lambda x, W, b: nn.functional.mse_loss(x, torch.ones_like(x) * b.sum(),
                                                   reduction="none")),
}


def inputs():
    x = torch.randn(4, 3, dtype=D)
    return x + 0.1 * x.sign(), torch.randn(3, 3, dtype=D), torch.randn(3, dtype=D)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_vmap_over_each_function_equals_native(name):
    ours, theirs = FUNCTIONS[name]
    x, W, b = inputs()
    batched = torch.randn(5, *x.shape, dtype=D)
    torch.testing.assert_close(vmap(ours, in_dims=(0, None, None))(batched, W, b),
                               vmap(theirs, in_dims=(0, None, None))(batched, W, b))


@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["x", "W", "b"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_grad_jacrev_and_vjp_of_each_function_equal_native(name, argnum):
    ours, theirs = FUNCTIONS[name]
    args = inputs()

    def scalar(f):
        return lambda *a: f(*a).sin().sum()

    torch.testing.assert_close(grad(scalar(ours), argnums=argnum)(*args),
                               grad(scalar(theirs), argnums=argnum)(*args))
    torch.testing.assert_close(jacrev(ours, argnums=argnum)(*args),
                               jacrev(theirs, argnums=argnum)(*args))
    out, pull = vjp(ours, *args)
    ref_out, ref_pull = vjp(theirs, *args)
    cot = torch.randn_like(out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(pull(cot), ref_pull(cot))


def test_per_sample_grads_equal_a_python_loop():
    ours, _ = models()
    x, y = torch.randn(7, 6, dtype=D), torch.randn(7, 2, dtype=D)
    loss_fn = manual_grad.MSELoss()
    per_sample = manual_grad.per_sample_grads(ours, loss_fn, x, y)
    for i in range(len(x)):
        ours.zero_grad()
        loss_fn(ours(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in ours.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=f"{name}[{i}]")


def test_gradient_penalty_with_create_graph_equals_native():
    """loss + lambda * ||d loss / d x||^2, as in WGAN-GP: needs the backward's own backward."""
    ours, theirs = models()
    x, y = torch.randn(9, 6, dtype=D), torch.randn(9, 2, dtype=D)
    results = []
    for model, loss_fn in ((ours, manual_grad.MSELoss()), (theirs, nn.MSELoss())):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        loss = loss_fn(model(xi), y)
        (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
        total = loss + 10.0 * gx.square().sum()
        total.backward()
        results.append(([p.grad.clone() for p in model.parameters()], total.detach()))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("layer", ["LayerNorm", "BatchNorm1d", "Linear"])
def test_vmap_over_an_ensembles_parameters_on_one_input_equals_native(layer):
    # torch.func's model-ensembling recipe: parameters stacked and batched, the input not,
    # so a forward may not write a batched parameter into an unbatched tensor in place
    from torch.func import functional_call, stack_module_state

    def build(lib, seed):
        torch.manual_seed(seed)
        m = (lib.Linear(6, 6) if layer == "Linear" else getattr(lib, layer)(6)).to(D)
        for p in m.parameters():
            nn.init.normal_(p)
        return m.eval()

    x = torch.randn(4, 6, dtype=D)
    outs = []
    for lib in (manual_grad, nn):
        members = [build(lib, seed) for seed in range(3)]
        params, buffers = stack_module_state(members)
        base = build(lib, 0).to("meta")
        outs.append(vmap(lambda p, b, m=base: functional_call(m, (p, b), (x,)))(params,
                                                                              buffers))
    torch.testing.assert_close(outs[0], outs[1])


def test_layer_norm_of_a_constant_row_double_backward_equals_native():
    # zero variance: the statistics' derivatives at a constant row, where eps keeps the
    # layer smooth, through the norm-based variance and the in-place dx
    x = torch.randn(3, 5, dtype=D)
    x[1] = 0.7
    x.requires_grad_()
    w = torch.randn(5, dtype=D, requires_grad=True)
    b = torch.randn(5, dtype=D, requires_grad=True)
    results = []
    for f in (MF.layer_norm, torch.nn.functional.layer_norm):
        first = torch.autograd.grad(f(x, (5,), w, b, 1e-5).sin().sum(), (x, w, b),
                                    create_graph=True)
        second = torch.autograd.grad(sum(t.square().sum() for t in first), (x, w))
        results.append((*first, *second))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)



@pytest.mark.parametrize("which", ["mlp + MSELoss('none')", "mlp", "mlp_mse_loss",
                                   "linear_relu_mse_loss"])
def test_vectorized_jacobian_and_hessian_equal_native(which):
    """torch.autograd.functional's vectorize=True runs backward with batched incoming
    gradients (torch's older vmap, which refuses in-place and out= ops): the plain
    backward paths must step aside for it. The Jacobian of the outputs (and the Hessian
    of a scalar loss), in the input and the first weight, against torch's own ops."""
    ours, theirs = models()
    x, y = torch.randn(4, 6, dtype=D), torch.randn(4, 2, dtype=D)
    t = torch.randn(4, 5, dtype=D)  # linear_relu_mse_loss's target: one per hidden unit
    W = theirs[0].weight.detach()
    b1, W2, b2 = (p.detach() for p in (theirs[0].bias, theirs[2].weight, theirs[2].bias))

    def native(x, W1):
        h = torch.relu(x @ W1.t() + b1)
        if which == "linear_relu_mse_loss":
            return ((h - t) ** 2).mean()
        o = h @ W2.t() + b2
        return {"mlp + MSELoss('none')": (o - y) ** 2, "mlp": o,
                "mlp_mse_loss": ((o - y) ** 2).mean()}[which]

    def manual(x, W1):
        if which == "mlp + MSELoss('none')":
            params = {"0.weight": W1, "0.bias": b1, "2.weight": W2, "2.bias": b2}
            out = torch.func.functional_call(ours, params, (x,))
            return manual_grad.MSELoss(reduction="none")(out, y)
        if which == "mlp":
            return MF.mlp(x, W1, b1, W2, b2)
        if which == "mlp_mse_loss":
            return MF.mlp_mse_loss(x, W1, b1, W2, b2, y)
        return MF.linear_relu_mse_loss(x, W1, b1, t)

    for transform in (torch.autograd.functional.jacobian, torch.autograd.functional.hessian):
        if transform is torch.autograd.functional.hessian and native(x, W).dim():
            continue  # a Hessian is of a scalar
        ours_, theirs_ = (transform(f, (x, W), vectorize=True) for f in (manual, native))
        for a, b in zip(torch.utils._pytree.tree_leaves(ours_),
                        torch.utils._pytree.tree_leaves(theirs_), strict=True):
            torch.testing.assert_close(a, b)
