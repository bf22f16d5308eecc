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
