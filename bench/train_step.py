"""Training-step and epoch time of the seed's MLP (784 -> 50 -> ReLU -> 1, MSE, SGD),
manual_grad against torch.nn, in one process, interleaved, medians of several repeats.

A plain PyTorch loop over data already on the device (no DataLoader, no Lightning), so
what is measured is the layers' forward and backward plus the optimiser step. Rows:
torch.nn, the drop-in manual_grad layers, the FusedMLP block, and both drop-in models
under torch.compile(fullgraph=True) (ratio against compiled torch.nn).

    python bench/train_step.py
"""

import argparse

import torch
from torch import nn

import manual_grad
from bench.common import devices, interleaved, ms, table

N_EPOCH = 60_000


def build(lib, device):
    torch.manual_seed(0)
    if lib == "fused":
        model, loss_fn = manual_grad.FusedMLP(784, 50, 1), manual_grad.MSELoss()
    else:
        model = nn.Sequential(lib.Linear(784, 50), lib.ReLU(), lib.Linear(50, 1))
        loss_fn = lib.MSELoss()
    model = model.to(device)
    return model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.01)


def epoch_fn(lib, X, Y, batch, compiled=False):
    model, loss_fn, opt = build(lib, X.device)

    def loss_of(x, y):
        return loss_fn(model(x).squeeze(-1), y)

    # fullgraph: the hand-derived Functions are traced into the graph, backward included
    step_loss = torch.compile(loss_of, fullgraph=True) if compiled else loss_of

    def run():
        perm = torch.randperm(len(X), device=X.device)
        for idx in perm.split(batch):
            opt.zero_grad(set_to_none=True)
            loss = step_loss(X[idx], Y[idx])
            loss.backward()
            opt.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows (compiling takes ~30 s)")
    args = parser.parse_args()
    impls = {"native (torch.nn)": nn, "manual_grad drop-in": manual_grad,
             "manual_grad FusedMLP": "fused"}
    for device in devices():
        X = torch.randn(N_EPOCH, 784, device=device)
        Y = torch.randint(0, 10, (N_EPOCH,), device=device).float()
        rows = []
        for batch in args.batches:
            fns = {name: epoch_fn(lib, X, Y, batch) for name, lib in impls.items()}
            if not args.no_compile:
                fns["native + torch.compile"] = epoch_fn(nn, X, Y, batch, compiled=True)
                fns["manual_grad + torch.compile"] = epoch_fn(manual_grad, X, Y, batch,
                                                              compiled=True)
            times = interleaved(fns, device, repeats=args.repeats, warmup=1)
            steps = -(-N_EPOCH // batch)
            for name, t in times.items():
                # compiled rows are compared with compiled native, eager ones with eager
                base = times["native + torch.compile" if "compile" in name
                             else "native (torch.nn)"]
                rows.append([str(batch), name, ms(t), f"{t / steps * 1e6:.1f}", f"{t / base:.3f}"])
        table(f"Training epoch, plain loop, {N_EPOCH} x 784 -> 50 -> 1, SGD",
              ["batch", "layers", "epoch ms", "us/step", "ratio vs native"], rows, device,
              "train_step")


if __name__ == "__main__":
    main()
