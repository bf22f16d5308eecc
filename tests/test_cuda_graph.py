"""GraphedSteps and model.cuda_graph: a captured training step replays exactly the steps
the plain loop takes. On the CPU the capture is emulated (the same step run eagerly on
the static buffers), which checks everything but the capture; the GPU tests capture."""

import lightning as L
import pytest
import torch
from torch import nn

import manual_grad
from manual_grad.training import MNISTDataModule, MNISTRegressor
from manual_grad.training.cuda_graph import GraphedSteps

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def seed_model(impl, device="cpu", dtype=torch.float64):
    torch.manual_seed(0)
    if impl == "fused":
        model = manual_grad.FusedMLP(20, 8, 1, device=device, dtype=dtype)

        def loss_of(x, y):
            return model.mse_loss(x, y)
    else:
        model = nn.Sequential(manual_grad.Linear(20, 8, device=device, dtype=dtype),
                              manual_grad.ReLU(),
                              manual_grad.Linear(8, 1, device=device, dtype=dtype))
        mse = manual_grad.MSELoss()

        def loss_of(x, y):
            return mse(model(x).squeeze(-1), y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, loss_of, opt


def batches(device="cpu", dtype=torch.float64, sizes=(16,) * 9 + (5,) + (16,) * 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 20, generator=g, dtype=dtype).to(device),
             torch.randn(n, generator=g, dtype=dtype).to(device)) for n in sizes]


def plain_run(impl, data, device="cpu", dtype=torch.float64):
    model, loss_of, opt = seed_model(impl, device, dtype)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


@pytest.mark.parametrize("impl", ["manual", "fused"])
def test_emulated_replays_take_exactly_the_plain_steps(impl):
    data = batches()  # 9 full batches, a short one, 2 full ones
    expected_losses, expected_state = plain_run(impl, data)
    model, loss_of, opt = seed_model(impl)
    steps = GraphedSteps(loss_of, opt, warmup=3, emulate=True)
    losses = torch.stack([steps.step(x, y) for x, y in data])
    torch.testing.assert_close(losses, expected_losses, rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), expected_state, rtol=0, atol=0)
    # 3 warm-up steps, then every full batch replays; the short one runs as usual
    assert steps.replays == len(data) - 3 - 1


def test_capture_waits_for_a_batch_of_the_usual_shape():
    data = batches(sizes=(16, 16, 5, 16, 16))
    _, loss_of, opt = seed_model("manual")
    steps = GraphedSteps(loss_of, opt, warmup=2, emulate=True)
    for x, y in data[:3]:
        steps.step(x, y)
    assert steps.static is None  # the short batch after warm-up is not captured
    for x, y in data[3:]:
        steps.step(x, y)
    assert steps.static is not None and steps.static[0].shape == (16, 20)
    assert steps.replays == 2


def test_graphs_need_a_gpu_and_a_warm_up():
    _, loss_of, opt = seed_model("manual")
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedSteps(loss_of, opt, warmup=0)
    steps = GraphedSteps(loss_of, opt, warmup=1)
    x, y = batches()[0]
    steps.step(x, y)  # the warm-up step runs as usual, even on the CPU
    with pytest.raises(RuntimeError, match="need the batches on a CUDA device"):
        steps.step(x, y)


def test_cuda_graph_without_grouped_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="data.steps_per_batch > 1"):
        MNISTRegressor(in_features=784, hidden=12, cuda_graph=True)


def fit_regressor(data_dir, accelerator, cuda_graph, precision="32-true", epochs=2):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=8, val_size=16, download=False,
                         steps_per_batch=4)
    model = MNISTRegressor(in_features=784, hidden=12, steps_per_batch=4,
                           cuda_graph=cuda_graph)
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, precision=precision)
    trainer.fit(model, dm)
    return trainer, model


def test_cuda_graph_on_the_cpu_warns_and_trains_as_usual(tiny_mnist):
    with pytest.warns(UserWarning, match="model.cuda_graph is ignored: the model is on cpu"):
        trainer, graphed = fit_regressor(tiny_mnist, "cpu", cuda_graph=True)
    _, plain = fit_regressor(tiny_mnist, "cpu", cuda_graph=False)
    assert trainer.global_step == 20  # 80 training images, batches of 8, 2 epochs
    assert graphed.cuda_graph  # the setting is kept: a later fit on a GPU would use it
    torch.testing.assert_close(graphed.state_dict(), plain.state_dict(), rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("impl", ["manual", "fused"])
def test_captured_steps_match_eager_steps_on_the_gpu(impl):
    data = batches("cuda", torch.float32)
    expected_losses, expected_state = plain_run(impl, data, "cuda", torch.float32)
    model, loss_of, opt = seed_model(impl, "cuda", torch.float32)
    steps = GraphedSteps(loss_of, opt, warmup=3)
    losses = torch.stack([steps.step(x, y) for x, y in data])
    assert steps.replays == len(data) - 4
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.state_dict(), expected_state, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_train_py_with_cuda_graph_learns_what_it_learns_without(tiny_mnist):
    trainer, graphed = fit_regressor(tiny_mnist, "gpu", cuda_graph=True, epochs=3)
    assert graphed._graphed is not None and graphed._graphed.replays > 0
    assert trainer.global_step == 30
    _, plain = fit_regressor(tiny_mnist, "gpu", cuda_graph=False, epochs=3)
    torch.testing.assert_close(graphed.state_dict(), plain.state_dict(), rtol=1e-5,
                               atol=1e-6)
