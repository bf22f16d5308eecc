"""Outside oracles: real torchvision models, built with random weights (no download), then
converted. Outputs and every gradient equal torch.nn's in float64, in training and
evaluation mode; a training step runs with each model's own dropout; the converted
resnet18 compiles as one graph."""

import pytest
import torch
from torch import nn

import manual_grad

torchvision = pytest.importorskip("torchvision")

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}
RANDOM = (nn.Dropout, torchvision.ops.StochasticDepth)  # (and manual_grad's subclasses)


def _pair(name: str):
    torch.manual_seed(0)
    theirs = MODELS[name]().double()
    converted = manual_grad.convert(theirs)
    return converted, theirs


def _without_randomness(model: nn.Module, training: bool) -> nn.Module:
    """model in training or eval mode, its dropout layers off (they draw from different
    random streams in torch and here): BatchNorm still uses batch statistics in training."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, RANDOM):
            m.eval()
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_gives_torchs_outputs_and_every_gradient(name, training):
    converted, theirs = _pair(name)
    ours = converted.model
    kept = {type(ours.get_submodule(n)) for n in converted.kept}
    assert kept <= {torchvision.ops.Permute}  # (a transpose, torchvision's: no gradient)
    assert converted.native == {}  # every layer's parameters' gradients are hand-derived
    # (64 x 64: the last stage's BatchNorms then see 12 values a channel, not 3, a
    # condition under which float64 rounding stays at 1e-13 here, not 1e-10)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    outs, grads = [], []
    for model in (_without_randomness(ours, training), _without_randomness(theirs, training)):
        xi = x.clone().requires_grad_()
        y = model(xi)
        g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(y, [xi, *model.parameters()], g))
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for n, a, b in zip(names, grads[0], grads[1], strict=True):
        # float64 rounding, relative to the whole tensor (a norm): through dozens of
        # training-mode BatchNorms gradients reach 1e4-1e5 here, and their small elements
        # carry the large ones' rounding
        error = torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1.0)
        assert error < 1e-10, f"{n}: relative error {error:.2e}"
    for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)  # running stats


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_trains_a_step_with_its_own_dropout(name):
    converted, _ = _pair(name)
    model = converted.model.float().train()  # every dropout layer on, in-place ones too
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = manual_grad.CrossEntropyLoss()(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # every parameter gets a finite gradient, not all zero, through the model's dropout
    assert all(torch.isfinite(p.grad).all() and p.grad.any() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_converted_resnet18_compiles_as_one_graph_equal_to_eager():
    torch._dynamo.reset()
    converted, _ = _pair("resnet18")
    model = converted.model.float().train()
    for m in model.modules():  # (BatchNorm's running statistics: compare from one state)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # breaks would raise
    yc = compiled(x)
    grads_c = torch.autograd.grad(yc.sum(), list(model.parameters()))
    ye = model(x)
    grads_e = torch.autograd.grad(ye.sum(), list(model.parameters()))
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    for (n, _), a, b in zip(model.named_parameters(), grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=n)
