"""Under autocast, manual_grad layers follow torch.nn's dtypes forward and backward."""

import lightning as L
import pytest
import torch
from conftest import fit_grouped
from torch import nn

import manual_grad
from manual_grad.training import MNISTDataModule, MNISTRegressor


def pair(d_in=8):
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(d_in, 6), nn.ReLU(), nn.Linear(6, 1))
    ours = nn.Sequential(manual_grad.Linear(d_in, 6), manual_grad.ReLU(),
                         manual_grad.Linear(6, 1))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_cpu_bf16_autocast_dtypes_match_torch_nn_everywhere():
    ours, theirs = pair()
    x, y = torch.randn(32, 8), torch.randn(32)
    seen = {}
    for tag, model, loss_fn in (("ours", ours, manual_grad.MSELoss()),
                                ("theirs", theirs, nn.MSELoss())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model[1](model[0](x))
            out = model[2](hidden).squeeze(-1)
            loss = loss_fn(out, y)  # bf16 prediction against a float32 target
        loss.backward()
        seen[tag] = (hidden.dtype, out.dtype, loss.dtype,
                     [p.grad.dtype for p in model.parameters()], loss.detach(),
                     [p.grad for p in model.parameters()])
    assert seen["ours"][:4] == seen["theirs"][:4]
    assert seen["ours"][:3] == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert set(seen["ours"][3]) == {torch.float32}
    torch.testing.assert_close(seen["ours"][4], seen["theirs"][4])
    torch.testing.assert_close(seen["ours"][5], seen["theirs"][5], rtol=2e-2, atol=2e-3)


def test_backward_runs_in_the_forward_dtype_not_the_parameter_dtype():
    layer = manual_grad.Linear(8, 4)
    seen = []
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.register_hook(lambda g: seen.append(g.dtype))
    y.float().sum().backward()
    assert seen == [torch.bfloat16]
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("impl", ["manual", "native"])
def test_lightning_bf16_mixed_trains_without_dtype_errors(impl, tiny_mnist):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=16, val_size=16, download=False)
    model = MNISTRegressor(in_features=784, hidden=12, impl=impl)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["val_mse"])


def test_lightning_bf16_mixed_manual_equals_native(tiny_mnist):
    results = []
    for impl in ("manual", "native"):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=16, val_size=16,
                             download=False)
        model = MNISTRegressor(in_features=784, hidden=12, impl=impl)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", precision="bf16-mixed",
                            logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(model, dm)
        results.append(model.state_dict())
    torch.testing.assert_close(results[0], results[1], rtol=1e-2, atol=1e-3)


def test_float64_layers_are_left_alone_by_autocast_as_in_torch():
    ours = manual_grad.Conv2d(2, 3, 3, dtype=torch.float64)
    theirs = nn.Conv2d(2, 3, 3, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    lin = manual_grad.Linear(4, 2, dtype=torch.float64)
    lin_ref = nn.Linear(4, 2, dtype=torch.float64)
    lin_ref.load_state_dict(lin.state_dict())
    x, v = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == theirs(x).dtype == torch.float64
        assert lin(v).dtype == lin_ref(v).dtype == torch.float64
        torch.testing.assert_close(lin(v), lin_ref(v))


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "L1Loss", "HuberLoss", "MSELoss",
                                  "BCEWithLogitsLoss"])
def test_losses_run_in_float32_under_autocast_as_in_torch(name):
    logits = torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 5, (4,)) if name == "CrossEntropyLoss" else torch.rand(4, 5)
    ref_logits = logits.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = getattr(manual_grad, name)()(logits, target)
        theirs = getattr(nn, name)()(ref_logits, target)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_lightning_bf16_mixed_grouped_steps_equal_single_steps(tiny_mnist):
    """bf16-mixed has no GradScaler, so grouped steps take the plain inner step; they still
    run under Lightning's autocast and take exactly the steps K = 1 takes."""
    (t1, m1, _), (t3, m3, choices3) = (
        fit_grouped(tiny_mnist, k, max_epochs=2, precision="bf16-mixed", logger=False)
        for k in (1, 3))
    assert set(choices3) == {True}
    assert t1.global_step == t3.global_step
    torch.testing.assert_close(m3.state_dict(), m1.state_dict(), rtol=0, atol=0)


# ---- normalisation with half inputs, and the ops CUDA autocast runs in float32 ---------

NORMS = {
    "LayerNorm": lambda lib, dt: lib.LayerNorm(6, dtype=dt),
    "LayerNorm-no-affine": lambda lib, dt: lib.LayerNorm(6, elementwise_affine=False, dtype=dt),
    "BatchNorm1d-train": lambda lib, dt: lib.BatchNorm1d(6, dtype=dt),
    "BatchNorm1d-eval": lambda lib, dt: lib.BatchNorm1d(6, dtype=dt).eval(),
    "BatchNorm2d-train": lambda lib, dt: lib.BatchNorm2d(6, dtype=dt),
    "BatchNorm2d-eval": lambda lib, dt: lib.BatchNorm2d(6, dtype=dt).eval(),
}


def _norm_pair(name, param_dtype):
    torch.manual_seed(0)
    theirs = NORMS[name](nn, param_dtype)
    ours = NORMS[name](manual_grad, param_dtype)
    with torch.no_grad():  # parameters and running statistics away from 1 and 0
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t, dtype=torch.float32) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "cpu-autocast"])
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(NORMS))
def test_norm_layers_take_half_inputs_as_torch_does(name, dtype, param_dtype, autocast):
    """A bfloat16/float16 activation reaching LayerNorm or BatchNorm whose parameters stay
    float32 (mixed precision's usual layout) gives the input's dtype, as torch's kernels
    do. Both normalise a half input in float32 whatever the parameters' dtype. Oracles:
    torch.nn's dtypes and (loosely: it rounds differently) values, and float64 on the same
    rounded inputs, to the precision of the half dtype."""
    ours, theirs = _norm_pair(name, torch.float32 if param_dtype == "float32" else dtype)
    exact = NORMS[name](nn, torch.float64)
    exact.load_state_dict(theirs.state_dict())
    x = (torch.randn(8, 6) if "2d" not in name else torch.randn(4, 6, 3, 3)) * 3 + 1
    a, b = (x.to(dtype).requires_grad_() for _ in range(2))
    c = a.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        ya, yb = ours(a), theirs(b)
    yc = exact(c)
    assert ya.dtype == yb.dtype == dtype
    g = torch.randn_like(ya)
    for y, grad in ((ya, g), (yb, g), (yc, g.double())):
        y.backward(grad)
    assert a.grad.dtype == b.grad.dtype == dtype
    half = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3,
                                                                         "atol": 2e-3}
    loose = {k: 4 * v for k, v in half.items()}
    for mine, torchs, truth, what in [(ya, yb, yc, "output"), (a.grad, b.grad, c.grad, "dx")]:
        torch.testing.assert_close(mine.double(), truth.detach(), **half, msg=what)
        torch.testing.assert_close(mine, torchs, **loose, msg=what)
    for (pname, p1), p2, p3 in zip(ours.named_parameters(), theirs.parameters(),
                                   exact.parameters(), strict=True):
        assert p1.grad.dtype == p2.grad.dtype == p2.dtype, pname
        torch.testing.assert_close(p1.grad.double(), p3.grad, **half, msg=pname)
        torch.testing.assert_close(p1.grad, p2.grad, **loose, msg=pname)
    for (bname, t1), t2, t3 in zip(ours.named_buffers(), theirs.buffers(), exact.buffers(),
                                   strict=True):
        assert t1.dtype == t2.dtype, bname
        torch.testing.assert_close(t1.double(), t3.double(), **half, msg=bname)


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm1d-train", "BatchNorm1d-eval"])
@pytest.mark.parametrize(("x_dtype", "p_dtype"), [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float64)])
def test_norm_layers_refuse_the_dtype_mixes_torch_refuses(name, x_dtype, p_dtype):
    ours, theirs = _norm_pair(name, p_dtype)
    x = torch.randn(8, 6, dtype=x_dtype)
    with pytest.raises(RuntimeError):
        theirs(x)
    with pytest.raises(TypeError, match=rf"input is {x_dtype} but \w+ is {p_dtype}.*float32"):
        ours(x)


def test_the_float32_autocast_devices_are_those_torch_registers():
    """softmax, log_softmax and layer_norm have autocast kernels (torch's float32 policy)
    on exactly the device types functional.FLOAT32_AUTOCAST_DEVICES names."""
    from manual_grad.functional import FLOAT32_AUTOCAST_DEVICES
    for op in ("aten::softmax.int", "aten::log_softmax.int", "aten::layer_norm"):
        registered = {device for device in ("cpu", "cuda", "xpu", "mps")
                      if torch._C._dispatch_has_kernel_for_dispatch_key(
                          op, "Autocast" + device.upper())}
        assert registered == FLOAT32_AUTOCAST_DEVICES, op


@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax", "LayerNorm"])
def test_float32_autocast_path_upcasts_and_gives_half_gradients(name, monkeypatch):
    """The path CUDA autocast takes for these three, run on the CPU by counting the CPU in
    (torch's own CPU kernels do not upcast, so the oracle is our float32 layer on the
    upcast input): float32 out, the half input's gradient in its own dtype."""
    monkeypatch.setattr(manual_grad.functional, "FLOAT32_AUTOCAST_DEVICES",
                        frozenset({"cpu"}))
    layer = {"Softmax": lambda: manual_grad.Softmax(1),
             "LogSoftmax": lambda: manual_grad.LogSoftmax(1),
             "LayerNorm": lambda: manual_grad.LayerNorm(6)}[name]()
    x = torch.randn(8, 6).to(torch.float16).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    ref = layer(x32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad, x32.grad.half(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax", "LayerNorm", "BatchNorm1d"])
def test_cuda_autocast_dtypes_of_softmax_and_norms_match_torch(name, dtype):
    torch.manual_seed(0)
    make = {"Softmax": lambda lib: lib.Softmax(1), "LogSoftmax": lambda lib: lib.LogSoftmax(1),
            "LayerNorm": lambda lib: lib.LayerNorm(6),
            "BatchNorm1d": lambda lib: lib.BatchNorm1d(6)}[name]
    ours, theirs = make(manual_grad).cuda(), make(nn).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 6, device="cuda", dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        ya, yb = ours(a), theirs(b)
    assert ya.dtype == yb.dtype
    ya.float().sum().backward()
    yb.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == dtype
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
