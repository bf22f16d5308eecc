"""The kept 0-dim tensors that eager backward passes use in place of Python numbers."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import manual_grad.functional as MF
from manual_grad.functions import _constants
from manual_grad.functions._constants import constant


def test_a_constant_is_made_once_per_value_and_dtype():
    c = constant(0.375, torch.float32)
    assert c is constant(0.375, torch.float32)
    assert c.shape == () and c.dtype == torch.float32 and c.device.type == "cpu"
    assert c.item() == 0.375
    other = constant(0.375, torch.float64)
    assert other is not c and other.dtype == torch.float64
    assert constant(0.5, torch.float32) is not c


def test_a_constant_made_under_inference_mode_is_used_but_not_kept():
    with torch.inference_mode():
        inside = constant(0.8125, torch.float32)
    assert inside.is_inference() and inside.item() == 0.8125
    outside = constant(0.8125, torch.float32)
    assert not outside.is_inference()  # a later normal call gets (and keeps) a normal one
    assert outside is constant(0.8125, torch.float32)


def test_a_constant_made_under_a_fake_tensor_mode_is_not_kept():
    with FakeTensorMode():
        fake = constant(0.5625, torch.float32)
    assert type(fake) is not torch.Tensor
    kept = constant(0.5625, torch.float32)
    assert type(kept) is torch.Tensor and kept.item() == 0.5625


def test_a_constant_for_a_half_type_is_float32_as_torch_computes_with_numbers():
    x32 = torch.linspace(0.1, 100, 1000)
    for half in (torch.float16, torch.bfloat16):
        c = constant(0.1, half)
        assert c.dtype == torch.float32
        x = x32.to(half)
        product = x * c
        assert product.dtype == half
        assert torch.equal(product, x * 0.1)  # exactly what the number gives, where a
        assert not torch.equal(x * torch.tensor(0.1, dtype=half), x * 0.1)  # half one fails


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_plain_backwards_leave_the_kept_constants_unchanged(dtype):
    # the relu and mse backward passes multiply into new tensors, never into a constant
    x = torch.randn(8, 3, dtype=dtype, requires_grad=True)
    y = torch.randn(8, 3, dtype=dtype)
    for _ in range(3):
        MF.mse_loss(MF.relu(x), y).backward()
    assert constant(0.0, dtype).item() == 0.0
    kept_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert constant(2.0 / 24, dtype).item() == torch.tensor(2.0 / 24, dtype=kept_dtype).item()


def test_kept_constants_are_bounded():
    for n in range(_constants._MAX_KEPT + 10):  # e.g. a scale per batch size
        constant(1.0 / (n + 1), torch.float64)
    assert len(_constants._kept) <= _constants._MAX_KEPT
    assert constant(0.25, torch.float64).item() == 0.25


def test_the_constants_mix_with_tensors_on_another_device():
    """The kept constants are CPU tensors whatever device the gradients are on: torch lets
    a 0-dim CPU tensor into an op on another device, as it does a Python number. The meta
    device runs the same device check as CUDA (a 1-element CPU tensor is refused there),
    so every eager backward that uses a constant runs here on meta tensors, without a GPU."""
    u = torch.empty(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        torch.ne(u, torch.tensor([0.0]))  # the check is real: not 0-dim, refused
    x, y = torch.empty(8, 5, device="meta"), torch.empty(8, device="meta")
    W1 = torch.empty(4, 5, device="meta", requires_grad=True)
    b1 = torch.empty(4, device="meta", requires_grad=True)
    W2 = torch.empty(1, 4, device="meta", requires_grad=True)
    b2 = torch.empty(1, device="meta", requires_grad=True)
    for reduction in ("mean", "sum"):
        losses = [  # the drop-in's ReLU and MSE, and the single-pass Functions
            MF.mse_loss(MF.linear(MF.relu(MF.linear(x, W1, b1)), W2, b2).squeeze(-1), y,
                        reduction=reduction),
            MF.mlp_mse_loss(x, W1, b1, W2, b2, y, reduction),
            MF.linear_relu_mse_loss(x, W1[:1], b1[:1], y, reduction),
        ]
        for loss in losses:
            grads = torch.autograd.grad(loss, (W1, b1, W2, b2), allow_unused=True)
            assert all(g is None or g.device.type == "meta" for g in grads)
