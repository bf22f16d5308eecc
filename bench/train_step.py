"""Training-step and epoch time of the seed's MLP (784 -> 50 -> ReLU -> 1, MSE, SGD),
manual_grad against torch.nn, in one process: each takes turns running a few dozen steps,
and each ratio is the median over turns of the pair's times in the same round.

A plain PyTorch loop over data already on the device (no DataLoader, no Lightning), so
what is measured is the layers' forward and backward plus the optimiser step. Rows:
torch.nn, the drop-in manual_grad layers, the FusedMLP block (with MSELoss, with its
loss fused in: ``FusedMLP.mse_loss``, and with the batch's gather fused in as well:
``FusedMLP.mse_loss(X, Y, rows=idx)``, which reads the batch from the resident dataset
as it sums), and both drop-in models under
torch.compile(fullgraph=True) (ratio against compiled torch.nn). One row splits the
drop-in's cost: the same Functions called straight from the modules, without
manual_grad.functional's argument checks (what the checks cost). Two rows bound what any
implementation can reach: three bare autograd.Functions with the same math and no checks
(the cost of Python Functions themselves), and the batch gather plus the two large matrix
products alone, with no ReLU, loss, autograd or optimiser (the arithmetic floor).

    python bench/train_step.py
"""

import argparse

import torch
from torch import nn
from torch.autograd import Function

import manual_grad
from bench.common import add_save_flag, devices, interleaved, ms, table
from manual_grad.functions import LinearFunction, MSELossFunction, ReLUFunction
from manual_grad.modules import weight_and_bias

N_EPOCH = 60_000


class _BareLinear(Function):
    """y = x W^T + b with nothing but the math: no checks, every tensor saved."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        return torch.addmm(b, x, W.t())

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        return (g @ W if ctx.needs_input_grad[0] else None), g.t() @ x, g.sum(0)


class _BareReLU(Function):
    @staticmethod
    def forward(ctx, z):
        u = z.clamp_min(0.0)
        ctx.save_for_backward(u)
        return u

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * u.sign()  # (wrong only where u is NaN)


class _BareMSE(Function):
    @staticmethod
    def forward(ctx, u, y):
        d = u - y
        ctx.save_for_backward(d)
        return d.square().mean()

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return d * (g * (2.0 / d.numel())), None


class bare:  # noqa: N801 (a stand-in for a module namespace, as torch.nn)
    """The floor of hand-written autograd.Functions: the drop-in's math, nothing else."""

    class Linear(nn.Linear):
        def forward(self, x):
            return _BareLinear.apply(x, self.weight, self.bias)

    class ReLU(nn.ReLU):
        def forward(self, z):
            return _BareReLU.apply(z)

    class MSELoss(nn.MSELoss):
        def forward(self, u, y):
            return _BareMSE.apply(u, y)


class unchecked:  # noqa: N801 (a stand-in for a module namespace, as torch.nn)
    """The drop-in modules less manual_grad.functional's argument checks: each forward
    calls its Function (the very one the drop-in uses) directly."""

    class Linear(nn.Linear):
        def forward(self, x):
            return LinearFunction.apply(x, *weight_and_bias(self))

    class ReLU(nn.ReLU):
        def forward(self, z):
            return ReLUFunction.apply(z, self.inplace)

    class MSELoss(nn.MSELoss):
        def forward(self, u, y):
            return MSELossFunction.apply(u, y, self.reduction)


def build(lib, device):
    torch.manual_seed(0)
    if lib in ("fused", "fused loss", "fused rows"):
        model, loss_fn = manual_grad.FusedMLP(784, 50, 1), manual_grad.MSELoss()
    else:
        model = nn.Sequential(lib.Linear(784, 50), lib.ReLU(), lib.Linear(50, 1))
        loss_fn = lib.MSELoss()
    model = model.to(device)
    return model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.01)


def batch_indices(n: int, batch: int, device: torch.device):
    """A function giving the next batch's indices, walking through shuffled epochs."""
    batches: list[torch.Tensor] = []

    def next_batch() -> torch.Tensor:
        if not batches:
            batches.extend(torch.randperm(n, device=device).split(batch))
        return batches.pop()
    return next_batch


def floor_fn(X, Y, batch, steps):
    """The gather and the two (batch x 784) products of each step, nothing else."""
    W = torch.randn(50, 784, device=X.device)
    g = torch.randn(batch, 50, device=X.device)
    next_batch = batch_indices(len(X), batch, X.device)

    def run():
        for _ in range(steps):
            idx = next_batch()
            x = X[idx]
            Y[idx]
            x @ W.t()  # forward: (n, 784) @ (784, 50)
            g[: len(x)].t() @ x  # dL/dW1: (50, n) @ (n, 784)
    return run


def steps_fn(lib, X, Y, batch, steps, compiled=False):
    """``steps`` training steps, walking through shuffled epochs of (X, Y)."""
    model, loss_fn, opt = build(lib, X.device)

    fused_loss = isinstance(lib, str) and lib == "fused loss"  # decided outside compile
    fused_rows = isinstance(lib, str) and lib == "fused rows"

    def loss_of(x, y):
        if fused_loss:  # the block and its loss in one Function
            return model.mse_loss(x, y)
        return loss_fn(model(x).squeeze(-1), y)

    # fullgraph: the hand-derived Functions are traced into the graph, backward included
    step_loss = torch.compile(loss_of, fullgraph=True) if compiled else loss_of
    next_batch = batch_indices(len(X), batch, X.device)

    def run():
        for _ in range(steps):
            idx = next_batch()
            opt.zero_grad(set_to_none=True)
            if fused_rows:  # the same batch, gathered inside the loss as it is summed
                loss = model.mse_loss(X, Y, rows=idx)
            else:
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
    parser.add_argument("--compiled-only", action="store_true",
                        help="only the torch.compile rows (native and drop-in)")
    args = add_save_flag(parser).parse_args()
    impls = {"native (torch.nn)": nn, "manual_grad drop-in": manual_grad,
             "manual_grad FusedMLP": "fused",
             "manual_grad FusedMLP.mse_loss (loss fused)": "fused loss",
             "manual_grad FusedMLP.mse_loss(X, Y, rows=idx) (gather fused too)": "fused rows",
             "drop-in's Functions without the argument checks": unchecked,
             "floor: bare autograd.Functions, same math": bare}
    if args.compiled_only:
        impls = {}
    for device in devices():
        X = torch.randn(N_EPOCH, 784, device=device)
        Y = torch.randint(0, 10, (N_EPOCH,), device=device).float()
        rows = []
        for batch in args.batches:
            # each turn is ~30-60 ms of steps: short enough that neighbouring turns see
            # the same machine speed, long enough to time
            steps = max(3, 60 * 64 // batch) if device.type == "cpu" else 50
            fns = {name: steps_fn(lib, X, Y, batch, steps) for name, lib in impls.items()}
            if not args.compiled_only:
                fns["floor: gather + the two big products only"] = floor_fn(X, Y, batch, steps)
            if args.compiled_only or not args.no_compile:
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
