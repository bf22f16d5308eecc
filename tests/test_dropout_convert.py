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


def test_dropout_in_place_on_a_view_as_in_efficientnet():
    """torchvision's EfficientNet classifier: Dropout(inplace=True) right after
    torch.flatten, whose result is a view. Torch allows it; the gradient is the formula's."""
    x = (torch.rand(4, 6, 1, 1) + 0.5).requires_grad_()
    h = torch.flatten(x * 1, 1)  # a view of the product
    torch.manual_seed(0)
    y = manual_grad.Dropout(0.25, inplace=True)(h)
    assert y is h
    kept = y != 0
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.flatten(1), g * kept / 0.75)


@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_gradcheck_with_a_fixed_draw_in_and_out_of_place(inplace):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(0)
        return MF.dropout(x * 1, 0.4, inplace=inplace)

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_compiles_fullgraph_with_the_eager_formula(inplace):
    torch._dynamo.reset()
    layer = manual_grad.Dropout(0.5, inplace=inplace)
    x = (torch.rand(64, 32) + 0.5).requires_grad_()
    y = torch.compile(lambda t: layer(t * 2), fullgraph=True, backend="aot_eager")(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], (4 * x)[kept].detach())  # 2 x / (1 - 0.5)
    assert 0.4 < kept.float().mean() < 0.6
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, 4 * g * kept)


@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_under_vmap_draws_per_sample_or_shared_masks(inplace):
    layer = manual_grad.Dropout(0.5, inplace=inplace)
    x = torch.rand(8, 200) + 0.5  # a batch of 8 samples of 200 units

    def f(row):
        return layer(row * 1)

    different = torch.func.vmap(f, randomness="different")(x)
    same = torch.func.vmap(f, randomness="same")(x)
    assert not torch.equal(different[0] != 0, different[1] != 0)
    assert all(torch.equal(same[0] != 0, same[i] != 0) for i in range(8))
    for y in (different, same):
        kept = y != 0
        torch.testing.assert_close(y[kept], 2 * x[kept])
    with pytest.raises(RuntimeError, match="randomness"):  # vmap's default, as torch.nn's
        torch.func.vmap(f)(x)


def test_per_sample_gradients_of_a_model_with_dropout_in_training():
    """DP-SGD's need: vmap(grad) of a model in train mode, each sample its own mask."""
    torch.manual_seed(0)
    model = manual_grad.convert(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5),
                                              nn.Linear(16, 1))).model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 5), torch.randn(6, 1)

    def loss(p, xi, yi):
        return ((torch.func.functional_call(model, p, (xi,)) - yi) ** 2).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0),
                            randomness="different")(params, x, y)
    assert grads["0.weight"].shape == (6, 16, 5)
    # each sample's first-layer gradient reaches only the hidden units its mask kept
    rows_used = (grads["0.weight"].abs().sum(2) != 0).float()
    assert rows_used.std(0).sum() > 0  # the samples' masks differ


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


def test_convert_report_lists_every_parameter_left_on_torchs_gradients():
    """A model with a layer manual_grad has no counterpart for (PReLU), a subclass it
    leaves alone, and a parameter held by no layer (a ViT's class_token, say): the report
    names each, with its owner, then the coverage line."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 4))
            self.body = nn.Sequential(nn.Linear(4, 4), nn.PReLU())

        def forward(self, x):
            return self.body(torch.cat([self.token.expand(len(x), 4), x]))

    report = manual_grad.convert(Model())
    assert report.kept == {"body.1": "PReLU (no manual_grad counterpart)"}
    assert report.native == {"body.1.weight": "PReLU at body.1"}
    assert report.outside == {"token": "Model at <root>"}
    assert report.coverage() == (20 / 21, 1 / 2)
    text = str(report)
    assert "    body.1.weight (PReLU at body.1)" in text
    assert "    token (Model at <root>)" in text
    assert text.splitlines()[-1] == ("hand-derived gradients: 95.2% of layer parameters "
                                     "(20 of 21), 1 of 2 layers (50.0%)")


def test_convert_replaces_a_parametrized_layer_and_names_a_subclass():
    from torch.nn.utils import parametrizations, parametrize

    class MyLayerNorm(nn.LayerNorm):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), MyLayerNorm(4))
    parametrizations.weight_norm(model[0])
    report = manual_grad.convert(model)
    assert report.replaced == {"0": "Linear (parametrized weight)"}
    assert report.kept == {"1": "MyLayerNorm, a subclass of torch.nn.LayerNorm: its forward "
                                "may differ, so it is not converted"}
    assert set(report.native) == {"1.weight", "1.bias"} and report.outside == {}
    converted = report.model
    assert isinstance(converted[0], manual_grad.Linear)
    x = torch.randn(5, 3)
    y1, y2 = model(x), converted(x)
    torch.testing.assert_close(y1, y2)
    assert "LinearFunction" in type(y2.grad_fn.next_functions[0][0]).__name__
    g1 = torch.autograd.grad(y1.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(y2.sum(), list(converted.parameters()))
    torch.testing.assert_close(g1, g2)
    parametrize.remove_parametrizations(converted[0], "weight")
    assert type(converted[0]) is manual_grad.Linear  # and back to a plain manual layer
