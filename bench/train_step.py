"""Training-step and epoch time of the seed's MLP (784 -> 50 -> ReLU -> 1, MSE, SGD),
manual_grad against torch.nn, in one process: each takes turns running a few dozen steps,
and each ratio is the median over turns of the pair's times in the same round.

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


def steps_fn(lib, X, Y, batch, steps, compiled=False):
    """``steps`` training steps, walking through shuffled epochs of (X, Y)."""
    model, loss_fn, opt = build(lib, X.device)

    def loss_of(x, y):
        return loss_fn(model(x).squeeze(-1), y)

    # fullgraph: the hand-derived Functions are traced into the graph, backward included
    step_loss = torch.compile(loss_of, fullgraph=True) if compiled else loss_of
    batches: list[torch.Tensor] = []

    def run():
        for _ in range(steps):
            if not batches:
                batches.extend(torch.randperm(len(X), device=X.device).split(batch))
            idx = batches.pop()
            opt.zero_grad(set_to_none=True)
            loss = step_loss(X[idx], Y[idx])
            loss.backward()
            opt.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
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
            # each turn is ~30-60 ms of steps: short enough that neighbouring turns see
            # the same machine speed, long enough to time
            steps = max(1, 60 * 64 // batch) if device.type == "cpu" else 50
            fns = {name: steps_fn(lib, X, Y, batch, steps) for name, lib in impls.items()}
            if not args.no_compile:
                fns["native + torch.compile"] = steps_fn(nn, X, Y, batch, steps, True)
                fns["manual_grad + torch.compile"] = steps_fn(manual_grad, X, Y, batch, steps,
                                                              True)
            times = interleaved(fns, device, repeats=args.rounds, warmup=2)
            per_epoch = -(-N_EPOCH // batch)
            for name in fns:
                # compiled rows are compared with compiled native, eager ones with eager
                base = "native + torch.compile" if "compile" in name else "native (torch.nn)"
                step = times.median(name) / steps
                rows.append([str(batch), name, ms(step * per_epoch), f"{step * 1e6:.1f}",
                             f"{times.ratio(name, base):.3f}"])
        table(f"Training steps, plain loop, {N_EPOCH} x 784 -> 50 -> 1, SGD (epoch = "
              "steps per epoch x median step)",
              ["batch", "layers", "epoch ms", "us/step", "ratio vs native"], rows, device,
              "train_step")


if __name__ == "__main__":
    main()
