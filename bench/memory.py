"""Memory of one training step of the seed's MLP, manual_grad against torch.nn.

On CUDA: peak allocated bytes during forward + backward (torch.cuda.max_memory_allocated).
On CPU, where torch keeps no allocator statistics: the bytes autograd keeps alive between
forward and backward (every tensor saved for backward, counted once), the part of the
peak that a layer implementation controls (the batch and the parameters, there anyway,
are left out). Columns: torch.nn, the drop-in layers, and FusedMLP.mse_loss, whose
forward also holds the gradient sums until backward: counted here, although they are the
parameters' gradients themselves, which every implementation holds after backward.

    python bench/memory.py
"""

import argparse

import torch
from torch import nn

import manual_grad
from bench.common import devices, table


def step_memory(lib, batch: int, device: torch.device, warmup: bool = True) -> int:
    if warmup:  # cuBLAS allocates its workspace on first use: keep that out of the peak
        step_memory(lib, batch, device, warmup=False)
    torch.manual_seed(0)
    if lib == "fused loss":
        model = manual_grad.FusedMLP(784, 50, 1).to(device)
    else:
        model = nn.Sequential(lib.Linear(784, 50), lib.ReLU(), lib.Linear(50, 1)).to(device)
        loss_fn = lib.MSELoss()
    X = torch.randn(batch, 784, device=device)
    Y = torch.randn(batch, device=device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if lib == "fused loss":
            loss = model.mse_loss(X, Y)
            for t in loss.grad_fn.sums or ():  # held on ctx for backward, not saved
                if t is not None:
                    pack(t)
        else:
            loss = loss_fn(model(X).squeeze(-1), Y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # the batch and the parameters exist anyway, not because of the layers: leave them out
    theirs = {X.untyped_storage().data_ptr()} | {
        p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in saved.items() if k not in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096, 60000])
    args = parser.parse_args()
    for device in devices():
        what = "peak allocated, bytes" if device.type == "cuda" else "saved for backward, bytes"
        rows = []
        for batch in args.batches:
            native = step_memory(nn, batch, device)
            manual = step_memory(manual_grad, batch, device)
            fused = step_memory("fused loss", batch, device)
            rows.append([str(batch), f"{native:,}", f"{manual:,}", f"{manual / native:.3f}",
                         f"{fused:,}", f"{fused / native:.3f}"])
        table(f"Memory of one training step ({what})",
              ["batch", "torch.nn", "manual_grad drop-in", "ratio", "FusedMLP.mse_loss",
               "ratio"], rows, device, "memory")


if __name__ == "__main__":
    main()
