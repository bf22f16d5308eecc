"""Dropout (random, so checked by its formula and statistics) and convert()."""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
from manual_grad import functional as MF


def test_dropout_scales_kept_units_and_routes_the_gradient_through_them():
    x = torch.rand(200, 300) + 0.5  # no zeros, so a zero output means a dropped unit
    x.requires_grad_()
    y = manual_grad.Dropout(p=0.3)(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 60,000 Bernoulli draws
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept / 0.7)


def test_dropout_keeps_only_a_boolean_mask_for_backward():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MF.dropout(torch.randn(64, 50, requires_grad=True), 0.5)
    assert [t.dtype for t in saved] == [torch.bool]  # 1 byte per unit, not a float copy


def test_dropout_gradcheck_and_gradgradcheck_with_a_fixed_draw():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(0)  # the same mask on every call gradcheck makes
        return MF.dropout(x, 0.4)

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def test_dropout_eval_p0_p1_and_inplace_match_torch():
    x = torch.randn(10, 10)
    assert manual_grad.Dropout(0.5).eval()(x) is x
    assert manual_grad.Dropout(0.0)(x) is x
    y = manual_grad.Dropout(1.0)(x.clone().requires_grad_())
    torch.testing.assert_close(y, nn.Dropout(1.0)(x))
    z = x.clone() * 1.0
    out = manual_grad.Dropout(0.5, inplace=True)(z)
    assert out.data_ptr() == z.data_ptr()
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\], got 1.5"):
        MF.dropout(x, 1.5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.heads = nn.ModuleDict({"a": nn.Linear(4 * 4 * 4, 3), "b": nn.PReLU()})
        self.extra = nn.ModuleList([nn.Embedding(10, 3, sparse=True), nn.GELU("tanh"),
                                    nn.AvgPool2d(2, ceil_mode=True)])

    def forward(self, x):
        h = self.features(x).flatten(1)
        return self.extra[1](self.heads["a"](h))


def test_convert_nested_model_same_outputs_and_gradients():
    torch.manual_seed(0)
    original = Block()
    converted, replaced, kept = manual_grad.convert(original)
    assert type(converted.features[0]) is manual_grad.Conv2d
    assert type(converted.heads["a"]) is manual_grad.Linear
    assert type(converted.extra[1]) is manual_grad.GELU
    assert type(original.features[0]) is nn.Conv2d  # inplace=False left it alone
    assert replaced == {"features.0": "Conv2d", "features.1": "BatchNorm2d",
                        "features.2": "ReLU", "features.3": "MaxPool2d", "heads.a": "Linear",
                        "extra.1": "GELU", "extra.2": "AvgPool2d"}
    assert kept == {"heads.b": "PReLU (no manual_grad counterpart)",
                    "extra.0": "Embedding (sparse=True is not supported by manual_grad)"}
    x = torch.randn(5, 1, 8, 8)
    for model in (original, converted):
        model.train()
    y1, y2 = original(x), converted(x)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    for (name, p1), p2 in zip(original.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
    torch.testing.assert_close(original.state_dict(), converted.state_dict())  # running stats


def test_convert_in_place_keeps_the_very_parameters():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    weight = model[0].weight
    result = manual_grad.convert(model, inplace=True)
    assert result.model is model and model[0].weight is weight  # an optimizer keeps working
    assert type(model[0]) is manual_grad.Linear and type(model[1]) is manual_grad.Tanh
    assert "replaced 2 layers" in str(result)


def test_convert_leaves_user_subclasses_alone():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(3, 2))
    converted = manual_grad.convert(model).model
    assert type(converted[0]) is MyLinear
