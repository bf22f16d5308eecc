"""Memory of one training step of the seed's MLP, manual_grad against torch.nn.

On CUDA: peak allocated bytes during forward + backward (torch.cuda.max_memory_allocated).
On CPU, where torch keeps no allocator statistics: the bytes autograd keeps alive between
forward and backward (every tensor saved for backward, counted once), the part of the
peak that a layer implementation controls.

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
        loss = loss_fn(model(X).squeeze(-1), Y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # the batch itself is the caller's, not the layers': leave it out
    return sum(v for k, v in saved.items() if k != X.untyped_storage().data_ptr())


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
            rows.append([str(batch), f"{native:,}", f"{manual:,}", f"{manual / native:.3f}"])
        table(f"Memory of one training step ({what})",
              ["batch", "torch.nn", "manual_grad", "ratio"], rows, device, "memory")


if __name__ == "__main__":
    main()
