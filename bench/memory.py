"""Memory of one training step of the seed's MLP, manual_grad against torch.nn.

On CUDA: peak allocated bytes during forward + backward (torch.cuda.max_memory_allocated).
On CPU, where torch keeps no allocator statistics: the bytes autograd keeps alive between
forward and backward (every tensor saved for backward, counted once), the part of the
peak that a layer implementation controls (the batch and the parameters, there anyway,
are left out). Columns: torch.nn, the drop-in layers, and FusedMLP.mse_loss, whose
forward also holds the gradient sums until backward: counted here, although they are the
parameters' gradients themselves, which every implementation holds after backward.

The last pair of columns is a step that starts from a resident dataset and the batch's
indices: torch.nn on the gathered ``X[idx]``, against ``FusedMLP.mse_loss(X, Y,
rows=idx)``, which gathers ~4 MB at a time into one reused buffer as it sums. Here the
gathered batch exists only because of the step, so it is counted (torch.nn saves it for
backward); the dataset is left out. On the CPU the rows= buffer is not counted: it is
freed before forward returns, so it is not kept until backward.

    python bench/memory.py
"""

import argparse

import torch
from torch import nn

import manual_grad
from bench.common import add_save_flag, devices, table


def step_memory(lib, batch: int, device: torch.device, warmup: bool = True,
                from_rows: bool = False) -> int:
    """Bytes of one step (see the module doc); ``from_rows``: the batch is ``batch`` rows
    of a resident dataset twice that size, picked by index inside the step."""
    if warmup:  # cuBLAS allocates its workspace on first use: keep that out of the peak
        step_memory(lib, batch, device, warmup=False, from_rows=from_rows)
    torch.manual_seed(0)
    if lib == "fused loss":
        model = manual_grad.FusedMLP(784, 50, 1).to(device)
    else:
        model = nn.Sequential(lib.Linear(784, 50), lib.ReLU(), lib.Linear(50, 1)).to(device)
        loss_fn = lib.MSELoss()
    rows = torch.randperm(2 * batch, device=device)[:batch] if from_rows else None
    X = torch.randn(batch if rows is None else 2 * batch, 784, device=device)
    Y = torch.randn(len(X), device=device)
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
            loss = model.mse_loss(X, Y, rows=rows)
            for t in loss.grad_fn.sums or ():  # held on ctx for backward, not saved
                if t is not None:
                    pack(t)
        elif rows is not None:
            loss = loss_fn(model(X[rows]).squeeze(-1), Y[rows])
        else:
            loss = loss_fn(model(X).squeeze(-1), Y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # the batch and the parameters exist anyway, not because of the layers: leave them out
    theirs = {X.untyped_storage().data_ptr()} | {
        p.untyped_storage().data_ptr() for p in model.parameters()}
    if rows is not None:  # the targets are the resident dataset's too
        theirs.add(Y.untyped_storage().data_ptr())
    return sum(v for k, v in saved.items() if k not in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096, 60000])
    args = add_save_flag(parser).parse_args()
    for device in devices():
        what = "peak allocated, bytes" if device.type == "cuda" else "saved for backward, bytes"
        rows = []
        for batch in args.batches:
            native = step_memory(nn, batch, device)
            manual = step_memory(manual_grad, batch, device)
            fused = step_memory("fused loss", batch, device)
            native_idx = step_memory(nn, batch, device, from_rows=True)
            fused_rows = step_memory("fused loss", batch, device, from_rows=True)
            rows.append([str(batch), f"{native:,}", f"{manual:,}", f"{manual / native:.3f}",
                         f"{fused:,}", f"{fused / native:.3f}", f"{native_idx:,}",
                         f"{fused_rows:,}", f"{fused_rows / native_idx:.3f}"])
        table(f"Memory of one training step ({what})",
              ["batch", "torch.nn", "manual_grad drop-in", "ratio", "FusedMLP.mse_loss",
               "ratio", "torch.nn on X[idx]", "FusedMLP.mse_loss(X, Y, rows=idx)", "ratio"],
              rows, device, "memory")


if __name__ == "__main__":
    main()
