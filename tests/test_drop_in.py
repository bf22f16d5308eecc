"""Swapping manual_grad modules into a torch.nn model changes no number."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import manual_grad


def seed_network(lib, d_in=784, hidden=50, dtype=torch.float64):
    return nn.Sequential(lib.Linear(d_in, hidden, dtype=dtype), lib.ReLU(),
                         lib.Linear(hidden, 1, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_network_same_loss_and_gradients_as_torch_nn(dtype):
    theirs = seed_network(nn, dtype=dtype)
    ours = seed_network(manual_grad, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    X = torch.randn(256, 784, dtype=dtype)
    Y = torch.randint(0, 10, (256,)).to(dtype)
    l1 = manual_grad.MSELoss()(ours(X).squeeze(-1), Y)
    l2 = nn.MSELoss()(theirs(X).squeeze(-1), Y)
    l1.backward()
    l2.backward()
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol, atol=atol, msg=name)


def test_sgd_steps_follow_torch_nn_step_by_step():
    theirs = seed_network(nn, d_in=20, hidden=8)
    ours = seed_network(manual_grad, d_in=20, hidden=8)
    ours.load_state_dict(theirs.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ours, theirs)]
    X, Y = torch.randn(64, 20, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    for _ in range(20):
        losses = []
        for model, opt, loss_fn in zip((ours, theirs), opts,
                                       (manual_grad.MSELoss(), nn.MSELoss()), strict=True):
            opt.zero_grad()
            loss = loss_fn(model(X).squeeze(-1), Y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-10, atol=1e-12)


def test_modules_are_instances_of_their_torch_nn_counterparts():
    # code that dispatches on the torch.nn type (init loops, optimiser groups) keeps working
    assert isinstance(manual_grad.Linear(2, 2), nn.Linear)
    assert isinstance(manual_grad.ReLU(), nn.ReLU)
    assert isinstance(manual_grad.MSELoss(), nn.MSELoss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_network_on_cuda_matches_torch_nn(dtype):
    theirs = seed_network(nn, dtype=dtype).cuda()
    ours = seed_network(manual_grad, dtype=dtype).cuda()
    ours.load_state_dict(theirs.state_dict())
    X = torch.randn(512, 784, dtype=dtype, device="cuda")
    Y = torch.randint(0, 10, (512,), device="cuda").to(dtype)
    l1 = manual_grad.MSELoss()(ours(X).squeeze(-1), Y)
    l2 = nn.MSELoss()(theirs(X).squeeze(-1), Y)
    l1.backward()
    l2.backward()
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)  # TF32 may differ
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_follows_torch_dtypes(dtype):
    theirs = seed_network(nn, dtype=torch.float32).cuda()
    ours = seed_network(manual_grad, dtype=torch.float32).cuda()
    ours.load_state_dict(theirs.state_dict())
    X = torch.randn(256, 784, device="cuda")
    Y = torch.randint(0, 10, (256,), device="cuda").float()
    with torch.autocast("cuda", dtype=dtype):
        out1, out2 = ours(X), theirs(X)
        assert out1.dtype == out2.dtype == dtype
        l1 = manual_grad.MSELoss()(out1.squeeze(-1).float(), Y)
        l2 = nn.MSELoss()(out2.squeeze(-1).float(), Y)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-2, atol=1e-2)
    for p1, p2 in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert p1.grad.dtype == torch.float32
        torch.testing.assert_close(p1.grad, p2.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_autocast_leaves_cuda_layers_alone():
    # The usual-case checks only ask whether autocast is on for *any* device; CPU
    # autocast must then still leave CUDA tensors in float32, as torch does.
    theirs = seed_network(nn, dtype=torch.float32).cuda()
    ours = seed_network(manual_grad, dtype=torch.float32).cuda()
    ours.load_state_dict(theirs.state_dict())
    X = torch.randn(64, 784, device="cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out1, out2 = ours(X), theirs(X)
    assert out1.dtype == out2.dtype == torch.float32
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-5)  # (TF32 may differ)


def _reparametrize(kind, layer):
    """Apply a torch.nn.utils tool that moves ``weight`` (and ``bias``) out of the
    layer's _parameters, deterministically."""
    if kind == "prune":
        prune.l1_unstructured(layer, "weight", amount=0.5)
        prune.l1_unstructured(layer, "bias", amount=0.5)
    elif kind == "weight_norm":
        parametrizations.weight_norm(layer)
    else:
        class Double(nn.Module):
            def forward(self, t):
                return 2 * t
        parametrize.register_parametrization(layer, "weight", Double())
        parametrize.register_parametrization(layer, "bias", Double())
    return layer


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "parametrize"])
@pytest.mark.parametrize("block", ["Linear", "FusedMLP"])
def test_pruning_weight_norm_and_parametrizations_reach_the_hand_derived_layers(kind, block):
    # these tools replace layer.weight by a computed tensor; the fast parameter reads in
    # forward must still see it, and the gradients must reach the new leaves
    torch.manual_seed(0)
    if block == "Linear":
        ours, theirs = manual_grad.Linear(6, 4, dtype=torch.float64), nn.Linear(6, 4,
                                                                              dtype=torch.float64)
    else:
        ours = manual_grad.FusedMLP(6, 5, 4, dtype=torch.float64)
        theirs = nn.Sequential(nn.Linear(6, 5, dtype=torch.float64), nn.ReLU(),
                               nn.Linear(5, 4, dtype=torch.float64))
    theirs.load_state_dict(ours.state_dict())
    for module in (ours, theirs):
        _reparametrize(kind, module if block == "Linear" else module[0])
    x = torch.randn(7, 6, dtype=torch.float64)
    out = ours(x)
    torch.testing.assert_close(out, theirs(x))
    out.square().sum().backward()
    theirs(x).square().sum().backward()
    for (name, p1), p2 in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
