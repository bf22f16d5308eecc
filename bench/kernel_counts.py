"""Ops a step dispatches, manual_grad against torch.nn: what a GPU's host pays per step.

On a GPU a small batch's step is host work: each op torch dispatches launches at least
one kernel (some more: ``mse_loss`` with a reduction is an elementwise kernel and then a
reduction), and the arithmetic is a tenth of the step (README, Performance). So the
number of ops a step dispatches predicts the GPU ratios better than anything measured
on a CPU. Counted here with a ``TorchDispatchMode``, which sees every op that
reaches torch's kernels: forward and backward of one step (the optimiser is left out:
it is the same ``torch.optim.SGD`` on both sides), without views and allocations, which
launch nothing.

Counted on the CPU, and on a GPU when there is one; without one, on the meta device
instead. A meta tensor has no values, so the code takes the path it takes on a GPU:
one chunk of rows, no blocks of rows, and the incoming gradient never read on the host.
Counting is deterministic, so one run is the answer: no timing, no repeats.

    python -m bench.kernel_counts
"""

import argparse
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import manual_grad
from bench.common import add_save_flag, devices, table
from manual_grad import functional as MF

# Ops that launch no kernel: allocations (memory only), lift_fresh (wraps a new tensor),
# and _local_scalar_dense, ``.item()``: a host read, which the GPU path never makes.
NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                       "new_empty_strided", "lift_fresh", "_local_scalar_dense"})


class OpLog(TorchDispatchMode):
    """Records the name of every op that launches a kernel (views and NO_KERNEL left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def count(forward: Callable[[], torch.Tensor],
          params: list[torch.Tensor]) -> tuple[list[str], list[str]]:
    """The ops of ``forward()`` and of the backward of the loss it returns, with the
    parameters' ``.grad`` cleared first, as ``zero_grad()`` leaves them. The loss's
    gradient is 2, not 1: on a GPU it cannot be read without waiting for the device, so
    code must scale by it whatever it is (on a CPU a gradient of exactly 1 may be read and
    skipped: ``loss.backward()`` gives 1, so the CPU's counts with 1 can be one lower)."""
    loss = forward()
    loss.backward(torch.full((), 2.0, device=loss.device))  # lazy setup: not counted
    for p in params:
        p.grad = None
    with OpLog() as fwd:
        loss = forward()
    with OpLog() as bwd:
        loss.backward(torch.full((), 2.0, device=loss.device))
    return fwd.ops, bwd.ops


Case = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]  # (forward, parameters)


def training_steps(device: torch.device, batch: int) -> dict[str, Case]:
    """The training step of bench/train_step.py, 784 -> 50 -> ReLU -> 1 with MSE, per
    implementation: its forward, from the resident dataset to the loss."""
    torch.manual_seed(0)
    X = torch.randn(2 * batch, 784, device=device)
    Y = torch.randn(2 * batch, device=device)
    idx = torch.randperm(2 * batch, device=device)[:batch]

    def layers(lib) -> Case:
        model = nn.Sequential(lib.Linear(784, 50), lib.ReLU(), lib.Linear(50, 1)).to(device)
        loss_fn = lib.MSELoss()
        return lambda: loss_fn(model(X[idx]).squeeze(-1), Y[idx]), list(model.parameters())

    fused = manual_grad.FusedMLP(784, 50, 1).to(device)
    params = list(fused.parameters())
    return {
        "torch.nn": layers(nn),
        "drop-in Linear, ReLU, MSELoss": layers(manual_grad),
        "FusedMLP + MSELoss":
            (lambda: manual_grad.MSELoss()(fused(X[idx]).squeeze(-1), Y[idx]), params),
        "FusedMLP.mse_loss": (lambda: fused.mse_loss(X[idx], Y[idx]), params),
        "FusedMLP.mse_loss(X, Y, rows=idx)": (lambda: fused.mse_loss(X, Y, rows=idx), params),
    }


def seed_work(device: torch.device, n: int) -> dict[str, Case]:
    """bench/seed_table.py's fast rows: lin -> relu -> mse with one output, the gradients
    of the parameters only."""
    torch.manual_seed(0)
    X = torch.randn(n, 784, device=device)
    Y = torch.randn(n, device=device)
    w = torch.randn(784, 1, device=device, requires_grad=True)
    W = torch.randn(1, 784, device=device, requires_grad=True)
    b = torch.zeros(1, device=device, requires_grad=True)
    return {
        "native autograd":
            (lambda: nn.functional.mse_loss(torch.relu(X @ w + b).squeeze(1), Y), [w, b]),
        "manual_grad.functional (three Functions)":
            (lambda: MF.mse_loss(MF.relu(MF.linear(X, W, b)).squeeze(1), Y), [W, b]),
        "linear_relu_mse_loss (single pass)":
            (lambda: MF.linear_relu_mse_loss(X, W, b, Y), [W, b]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--seed-rows", type=int, default=50_000)
    parser.add_argument("--list", action="store_true", help="also print each row's ops")
    args = add_save_flag(parser).parse_args()
    found = devices()
    for device in found:
        # the GPU's path: on the GPU itself, or else on the meta device beside the CPU
        paths = [device]
        if device.type == "cpu" and not any(d.type == "cuda" for d in found):
            paths.append(torch.device("meta"))
        cases = [(f"step, batch {batch}", path, name, case)
                 for batch in args.batches for path in paths
                 for name, case in training_steps(path, batch).items()]
        cases += [(f"seed's work, {args.seed_rows} rows", path, name, case)
                  for path in paths for name, case in seed_work(path, args.seed_rows).items()]
        rows = []
        for work, path, name, (fn, params) in cases:
            fwd, bwd = count(fn, params)
            where = {"cpu": "CPU", "meta": "GPU path (meta)"}.get(path.type, "GPU")
            rows.append([work, where, name, str(len(fwd)), str(len(bwd)),
                         str(len(fwd) + len(bwd))])
            if args.list:
                print(f"{work} | {where} | {name}\n  forward:  {' '.join(fwd)}\n"
                      f"  backward: {' '.join(bwd)}")
        table("Ops dispatched per forward + backward (views and allocations left out)",
              ["work", "path", "implementation", "forward", "backward", "total"], rows,
              device, "kernel_counts")


if __name__ == "__main__":
    main()
