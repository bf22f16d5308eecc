"""The seed's timing table, reproduced: forward + backward of lin -> relu -> mse on
50,000 x 784 inputs with w of shape (784, 1), each way of computing the gradients.

The single pass appears twice: as linear_relu_mse_loss chooses it on this machine (the
first call times it against the three layers and keeps the faster: functional.SINGLE_PASS)
and forced, so that the table shows what the choice weighed. The machine line lists the
CPU's caches, which decide it.

    python bench/seed_table.py            # CPU, and CUDA when present
"""

import argparse

import torch

from bench.common import add_save_flag, devices, interleaved, ms, table
from manual_grad import functional as MF
from manual_grad import reference as R


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = add_save_flag(parser).parse_args()
    for device in devices():
        seed_table(device, args.n, args.repeats)


def seed_table(device: torch.device, n: int, repeats: int) -> None:
    torch.manual_seed(0)
    X = torch.randn(n, 784, device=device)
    Y = torch.randint(0, 10, (n,), device=device).float()
    w = (torch.randn(784, 1, device=device) / 28).requires_grad_()
    b = torch.zeros(1, device=device, requires_grad=True)
    W = w.detach().t().contiguous().requires_grad_()  # nn.Linear layout (out, in)

    def by_hand(lin_grad):
        def run():
            Z = R.lin(X, w.detach(), b.detach())
            U = R.relu(Z)
            R.mse(U, Y)
            R.mse_grad(U, Y)
            R.relu_grad(Z, U)
            lin_grad(X, Z, w.detach(), b.detach())
        return run

    def manual_grad_functional():
        loss = MF.mse_loss(MF.relu(MF.linear(X, W, b)).squeeze(1), Y)
        loss.backward()

    def single_pass(setting):
        def run():
            MF.SINGLE_PASS = setting
            try:
                MF.linear_relu_mse_loss(X, W, b, Y).backward()
            finally:
                MF.SINGLE_PASS = "auto"
        return run

    def native():
        loss = torch.nn.functional.mse_loss(torch.relu(X @ w + b).squeeze(1), Y)
        loss.backward()

    fns = {
        "rows built row by row (reference.lin_grad_loop)": by_hand(R.lin_grad_loop),
        "w.g as a product, X.g by rows (reference.lin_grad_semi)": by_hand(R.lin_grad_semi),
        "fully vectorized, computes X.g (reference.lin_grad)": by_hand(R.lin_grad),
        "manual_grad.functional, parameters only": manual_grad_functional,
        "manual_grad single pass (linear_relu_mse_loss) as chosen here, parameters only":
            single_pass("auto"),
        "manual_grad single pass, forced (SINGLE_PASS='always'), parameters only":
            single_pass("always"),
        "native autograd, parameters only": native,
    }
    times = interleaved(fns, device, repeats=repeats, warmup=1)
    base = "native autograd, parameters only"
    # the two fast rows again, alone and for many more rounds: their ratio is the target
    fast = [name for name in fns if name.endswith("parameters only")]
    close = interleaved({name: fns[name] for name in fast}, device, repeats=repeats * 8)
    rows = [[name, ms((close if name in fast else times).median(name)),
             f"{(close if name in fast else times).ratio(name, base):.2f}x"] for name in fns]
    table(f"The seed's table: lin -> relu -> mse, forward + backward, {n} x 784",
          ["version", "ms", "vs native"], rows, device, "seed_table")


if __name__ == "__main__":
    main()
