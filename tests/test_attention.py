"""Attention: scaled_dot_product_attention and MultiheadAttention against their two oracles
(float64 gradcheck/gradgradcheck, and torch on the same inputs), every option, chunked
and not; then the model zoo: a ViT, a Transformer language model and a GPT-style decoder
converted whole."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manual_grad
from manual_grad import functional as MF

D = torch.float64


def qkv(*batch, L=5, S=7, E=4, Ev=6, dtype=D):
    return (torch.randn(*batch, L, E, dtype=dtype), torch.randn(*batch, S, E, dtype=dtype),
            torch.randn(*batch, S, Ev, dtype=dtype))


@pytest.fixture(params=[False, True], ids=["one-chunk", "chunked"])
def chunked(request, monkeypatch):
    """Run each test with the scores in one chunk, and in chunks of a few rows."""
    if request.param:
        monkeypatch.setattr(MF, "ATTENTION_CHUNK_ELEMENTS", 2 * 7 * 3)
    return request.param


OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool-mask": {"attn_mask": torch.rand(5, 7) < 0.7},
    "float-mask": {"attn_mask": torch.randn(5, 7, dtype=D)},
    "scale": {"scale": 0.3},
    "row-of-nothing": {"attn_mask": torch.tensor([[False] * 7] + [[True] * 7] * 4)},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_attention_matches_torch_and_finite_differences(option, chunked):
    torch.manual_seed(0)
    kwargs = OPTIONS[option]
    q, k, v = qkv(2, 3)
    outs = []
    for f in (MF.scaled_dot_product_attention, TF.scaled_dot_product_attention):
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        y = f(*a, **kwargs)
        outs.append((y, torch.autograd.grad(y, a, torch.ones_like(y) * 0.5 + y.detach())))
    torch.testing.assert_close(outs[0], outs[1])  # (a row that may attend nowhere: 0)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    assert gradcheck(lambda *t: MF.scaled_dot_product_attention(*t, **kwargs), args,
                     check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(lambda *t: MF.scaled_dot_product_attention(*t, **kwargs), args)


def test_attention_gradient_reaches_a_float_mask(chunked):
    q, k, v = qkv(2)
    mask = torch.randn(2, 5, 7, dtype=D, requires_grad=True)
    assert gradcheck(lambda m: MF.scaled_dot_product_attention(q, k, v, attn_mask=m), (mask,),
                     check_forward_ad=True)
    row_mask = torch.randn(1, 7, dtype=D, requires_grad=True)  # broadcast over the rows
    assert gradcheck(lambda m: MF.scaled_dot_product_attention(q, k, v, attn_mask=m),
                     (row_mask,))


def test_grouped_query_attention_matches_torch(chunked):
    q = torch.randn(2, 4, 5, 8, dtype=D, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, dtype=D, requires_grad=True) for _ in range(2))
    y = MF.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    ref = TF.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (q, k, v), g),
                               torch.autograd.grad(ref, (q, k, v), g))
    assert gradcheck(lambda *t: MF.scaled_dot_product_attention(*t, enable_gqa=True),
                     (q, k, v), check_forward_ad=True)


def test_attention_dropout_is_its_formula_with_the_mask_it_drew(chunked):
    """y = (softmax(q k^T s) * m / (1 - p)) v, m the mask drawn from the same seed."""
    q, k, v = (t.requires_grad_() for t in qkv(3))
    torch.manual_seed(7)
    y = MF.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    keep = torch.rand(3, 5, 7) >= 0.3
    a = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = (torch.softmax(a[0] @ a[1].mT / 2.0, -1) * keep / 0.7) @ a[2]
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, (q, k, v), g),
                               torch.autograd.grad(ref, a, g))


def test_attention_under_vmap_compile_and_meta():
    q, k, v = qkv(4, 2)
    looped = torch.stack([TF.scaled_dot_product_attention(q[i], k[i], v[i], is_causal=True)
                          for i in range(4)])
    torch.testing.assert_close(torch.func.vmap(
        lambda *t: MF.scaled_dot_product_attention(*t, is_causal=True))(q, k, v), looped)
    torch._dynamo.reset()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(lambda *t: MF.scaled_dot_product_attention(*t, is_causal=True),
                             fullgraph=True, backend="aot_eager")
    yc = compiled(*a)
    gc = torch.autograd.grad(yc.sum(), a)
    ye = MF.scaled_dot_product_attention(*a, is_causal=True)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, torch.autograd.grad(ye.sum(), a))
    m = [t.to("meta").requires_grad_() for t in (q, k, v)]
    y = MF.scaled_dot_product_attention(*m, is_causal=True)
    y.sum().backward()
    assert y.shape == looped.shape and m[0].grad.shape == q.shape


def test_chunked_attention_keeps_no_score_matrix(monkeypatch):
    """The backward keeps q, k and v (and the mask given), never an L x S block of
    scores or weights; a chunk holds at most ATTENTION_CHUNK_ELEMENTS scores."""
    monkeypatch.setattr(MF, "ATTENTION_CHUNK_ELEMENTS", 2 * 256 * 16)
    q, k, v = (t.requires_grad_() for t in qkv(2, L=256, S=256, dtype=torch.float32))
    assert MF.attention_rows(2, 256, 256) == 16
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = MF.scaled_dot_product_attention(q, k, v)
    assert saved == [q.shape, k.shape, v.shape]
    y.sum().backward()


def test_attention_refuses_what_torch_refuses():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="give attn_mask or is_causal=True, not both"):
        MF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                                        is_causal=True)
    with pytest.raises(ValueError, match="must share E"):
        MF.scaled_dot_product_attention(q, k[..., :3], v)


# ---- MultiheadAttention ---------------------------------------------------------------

MHA_OPTIONS = {
    "defaults": {},
    "batch-first": {"batch_first": True},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim-vdim": {"kdim": 5, "vdim": 3},
    "no-bias-dropout": {"bias": False, "dropout": 0.0},
}


def mha_inputs(kwargs, N=3, L=4, S=6, E=8, unbatched=False):
    kd, vd = kwargs.get("kdim", E), kwargs.get("vdim", E)

    def make(n, d):
        shape = (n, d) if unbatched else ((N, n, d) if kwargs.get("batch_first") else (n, N, d))
        return torch.randn(*shape, dtype=D)

    return make(L, E), make(S, kd), make(S, vd)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
@pytest.mark.parametrize("option", list(MHA_OPTIONS))
def test_multihead_attention_matches_torch(option, masks, need_weights):
    torch.manual_seed(0)
    kwargs = MHA_OPTIONS[option]
    theirs = nn.MultiheadAttention(8, 2, **kwargs).to(D)
    ours = manual_grad.convert(theirs).model
    assert type(ours) is manual_grad.MultiheadAttention
    q, k, v = mha_inputs(kwargs)
    call = {"need_weights": need_weights}
    if masks == "bool":
        call["attn_mask"] = torch.rand(4, 6) < 0.3
        call["key_padding_mask"] = torch.rand(3, 6) < 0.3
        call["key_padding_mask"][:, 0] = call["attn_mask"][:, 0] = False  # (no empty rows)
    elif masks == "float":
        call["attn_mask"] = torch.randn(2 * 3, 4, 6, dtype=D)  # one per sample and head
    results = []
    for module in (ours, theirs):
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        out, weights = module(*a, **call)
        g = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        results.append((out, weights, torch.autograd.grad(out, a + list(module.parameters()),
                                                          g)))
    torch.testing.assert_close(results[0], results[1])


def test_multihead_attention_self_attention_unbatched_and_causal():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 4).to(D)
    ours = manual_grad.convert(theirs).model
    x = torch.randn(5, 8, dtype=D)  # unbatched, query is key is value
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=D)
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True, "need_weights": False},
                   {"average_attn_weights": False}):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, wa = ours(a, a, a, **kwargs)
        yb, wb = theirs(b, b, b, **kwargs)
        torch.testing.assert_close((ya, wa), (yb, wb))
        ga = torch.autograd.grad(ya.sum(), [a, *ours.parameters()])
        gb = torch.autograd.grad(yb.sum(), [b, *theirs.parameters()])
        torch.testing.assert_close(ga, gb)


def test_multihead_attention_gradcheck():
    torch.manual_seed(0)
    module = manual_grad.MultiheadAttention(4, 2, add_bias_kv=True, dtype=D)
    x = torch.randn(3, 2, 4, dtype=D, requires_grad=True)
    params = dict(module.named_parameters())

    def f(x, *ps):
        out = torch.func.functional_call(module, dict(zip(params, ps, strict=True)), (x, x, x))
        return out[0]

    args = (x, *(p.detach().clone().requires_grad_() for p in params.values()))
    assert gradcheck(f, args, check_forward_ad=True)
    assert gradgradcheck(f, args)


# ---- the zoo --------------------------------------------------------------------------


class GPT(nn.Module):
    """A GPT-style decoder whose attention calls F.scaled_dot_product_attention."""

    class Block(nn.Module):
        def __init__(self, d, heads, dropout):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                     nn.Dropout(dropout))
            self.dropout = dropout

        def forward(self, x):
            B, T, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, -1)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            att = TF.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training
                                                  else 0.0)
            x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
            return x + self.mlp(self.ln2(x))

    def __init__(self, vocab=11, d=16, heads=2, layers=2, T=8, dropout=0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.Sequential(*(self.Block(d, heads, dropout) for _ in range(layers)))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, vocab))

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.blocks(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab=11, d=16, activation="relu"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True,
                                           activation=activation)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.head(self.encoder(self.tok(idx), mask=mask, is_causal=True))


def vit():
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5, dropout=0.1,
                              attention_dropout=0.1)
    nn.init.normal_(model.heads.head.weight)  # (torchvision starts it at 0: no gradient
    return model                              # would reach the layers below it)


ZOO = {
    "vit": (vit, lambda: torch.randn(2, 3, 16, 16)),
    "transformer-lm": (TransformerLM, lambda: torch.randint(0, 11, (2, 8))),
    "transformer-lm-gelu": (lambda: TransformerLM(activation="gelu"),
                            lambda: torch.randint(0, 11, (2, 8))),
    "gpt": (GPT, lambda: torch.randint(0, 11, (2, 8))),
}


def _zoo(name):
    make, data = ZOO[name]
    torch.manual_seed(0)
    theirs = make()
    return manual_grad.convert(theirs), theirs, data()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_converts_whole(name):
    report, _, _ = _zoo(name)
    assert report.kept == {} and report.native == {}
    assert report.coverage() == (1.0, 1.0)
    # no torch.nn layer is left (containers aside, and MultiheadAttention's out_proj,
    # whose parameters the converted attention uses itself)
    inside = {id(m) for a in report.model.modules() if isinstance(a, manual_grad.MultiheadAttention)
              for m in a.children()}
    for module in report.model.modules():
        if type(module).__module__.startswith("torch.nn.modules") and id(module) not in inside \
                and not any(True for _ in module.children()):
            pytest.fail(f"{type(module).__name__} was not replaced")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_gives_torchs_outputs_and_every_gradient(name, training):
    report, theirs, x = _zoo(name)
    ours = report.model
    results = []
    for model in (ours, theirs):
        model.double().train(training)
        for m in model.modules():  # dropout off: its random stream is not torch's
            if isinstance(m, nn.Dropout | nn.MultiheadAttention | GPT.Block):
                if hasattr(m, "dropout") and isinstance(m.dropout, float):
                    m.dropout = 0.0
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        xi = x.double() if x.is_floating_point() else x
        y = model(xi)
        g = torch.randn(y.shape, dtype=D, generator=torch.Generator().manual_seed(1))
        results.append((y, torch.autograd.grad(y, list(model.parameters()), g)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_trains_a_step_with_its_own_dropout(name):
    report, _, x = _zoo(name)
    model = report.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    y = model(x)
    target = torch.randint(0, y.shape[-1], y.shape[:-1])
    loss = manual_grad.CrossEntropyLoss()(y.reshape(-1, y.shape[-1]), target.reshape(-1))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # (an embedding's rows of tokens absent from the batch rightly stay as they were)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
               if p.dim() < 2 or p.shape[0] != 11)


AUTOCAST = {
    "MultiheadAttention": (lambda lib: lib.MultiheadAttention(8, 2, batch_first=True),
                           lambda: [torch.randn(2, 5, 8)] * 3),
    "GroupNorm": (lambda lib: lib.GroupNorm(2, 4), lambda: [torch.randn(3, 4, 5)]),
    "RMSNorm": (lambda lib: lib.RMSNorm(5), lambda: [torch.randn(3, 4, 5)]),
    "Conv1d": (lambda lib: lib.Conv1d(3, 4, 3), lambda: [torch.randn(2, 3, 9)]),
    "Hardswish": (lambda lib: lib.Hardswish(), lambda: [torch.randn(3, 4)]),
    "AdaptiveAvgPool2d": (lambda lib: lib.AdaptiveAvgPool2d(2), lambda: [torch.randn(2, 3, 5, 5)]),
}


@pytest.mark.parametrize("name", list(AUTOCAST))
def test_new_layers_under_cpu_autocast_run_as_torch_nn(name):
    """Under torch.autocast (CPU, bfloat16) each runs in the dtype torch.nn's runs in, with
    values to bfloat16's precision, and the parameters' gradients in their own dtype."""
    make, inputs = AUTOCAST[name]
    torch.manual_seed(0)
    theirs = make(nn)
    ours = manual_grad.convert(theirs).model
    raw = inputs()
    results = []
    for module in (ours, theirs):
        x = [t.clone().requires_grad_() for t in raw]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        results.append((out, [p.grad for p in module.parameters()] + [t.grad for t in x]))
    (a, grads_a), (b, grads_b) = results
    assert a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    for ga, gb in zip(grads_a, grads_b, strict=True):  # parameters', then inputs'
        assert ga.dtype == gb.dtype == torch.float32
        torch.testing.assert_close(ga, gb, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
def test_multihead_attention_compiles_fullgraph_like_eager(need_weights):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = manual_grad.MultiheadAttention(8, 2, batch_first=True, dtype=D)
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=D)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    yc = compiled(x, x, x, attn_mask=mask, need_weights=need_weights)[0]
    gc = torch.autograd.grad(yc.sum(), [x, *module.parameters()])
    ye = module(x, x, x, attn_mask=mask, need_weights=need_weights)[0]
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, torch.autograd.grad(ye.sum(), [x, *module.parameters()]))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_keeps_no_more_for_backward_than_torchs(causal):
    """What attention holds between forward and backward, beyond its inputs: nothing of
    size L x S (the weights are recomputed in backward), so no more than torch's own
    attention keeps, at a size small enough to be one chunk."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))

    def extra_bytes(sdpa):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = sdpa(q, k, v, is_causal=causal)
        inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
        out.sum().backward()
        return sum(n for ptr, n in saved.items() if ptr not in inputs)

    ours = extra_bytes(manual_grad.functional.scaled_dot_product_attention)
    assert ours < 2 * 4 * 64 * 64 * 4  # not even one float32 copy of the weights
    assert ours <= extra_bytes(torch.nn.functional.scaled_dot_product_attention)


# backward nodes that only move, split, join or add tensors: no layer's formula in them
STRUCTURAL = {"AccumulateGrad", "ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0",
              "PermuteBackward0", "SplitBackward0", "CloneBackward0", "AddBackward0",
              "CatBackward0", "SelectBackward0", "ExpandBackward0", "SliceBackward0",
              "UnsqueezeBackward0", "SqueezeBackward0", "ReshapeAliasBackward0"}


@pytest.mark.parametrize("name", [n for n in ZOO if n != "gpt"])  # (gpt: see below)
def test_zoo_model_backward_is_hand_derived_node_by_node(name):
    """Every node of the converted model's backward graph is a manual_grad Function or
    only moves tensors: nothing of a layer, its activation function included (held by
    nn.TransformerEncoderLayer as torch's F.relu / F.gelu), is left to torch. (The
    "gpt" model calls F.scaled_dot_product_attention in its own forward, which stays
    torch's, as documented.)"""
    report, theirs, x = _zoo(name)
    ours = {f"{n}Backward" for n in manual_grad.functions.__all__}
    seen, stack, torchs = set(), [report.model(x).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        if kind not in ours and kind not in STRUCTURAL:
            torchs.add(kind)
        stack.extend(f for f, _ in node.next_functions)
    assert torchs == set()
    for layer in theirs.modules():  # the model given is left as it was
        if isinstance(layer, nn.TransformerEncoderLayer):
            assert layer.activation in (TF.relu, TF.gelu)
