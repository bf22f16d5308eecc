"""Forward mode's cost: a Jacobian-vector product and a Hessian-vector product of a loss,
manual_grad's layers (their hand-derived jvps) against torch.nn's, in the same process.

- jvp: ``manual_grad.loss_jvp``, the loss and its derivative along a parameter direction
  (torch.func.jvp), one forward pass carrying tangents;
- hvp: ``manual_grad.loss_hvp``, forward over reverse (the jvp of the gradient).

Models: the seed's MLP (784 -> 50 -> ReLU -> 1, MSE) at batch 64 and 4096, and a
transformer encoder layer (d 64, 4 heads, T 32, batch 8), run on torch's math attention
(its CPU flash kernel has no forward mode: torch.nn's layer fails there otherwise). Times
are interleaved medians, ratios per round (bench/common.py).

    python -m bench.forward_ad           # prints the table
    python -m bench.forward_ad --save    # and writes bench/results/forward_ad-cpu.md
"""

import argparse

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import manual_grad
from bench.common import add_save_flag, interleaved, ms, table


def models():
    torch.manual_seed(0)
    yield ("seed MLP, batch 64", nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 1)),
           torch.randn(64, 784), torch.randn(64, 1))
    torch.manual_seed(0)
    yield ("seed MLP, batch 4096",
           nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 1)),
           torch.randn(4096, 784), torch.randn(4096, 1))
    torch.manual_seed(0)
    yield ("transformer layer, 8 x 32 x 64",
           nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True),
           torch.randn(8, 32, 64), torch.randn(8, 32, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = add_save_flag(parser).parse_args()
    cpu = torch.device("cpu")
    rows = []

    def loss_fn(out, target):
        return ((out - target) ** 2).mean()

    for name, theirs, x, y in models():
        ours = manual_grad.convert(theirs).model
        v = {k: torch.randn_like(p) for k, p in theirs.named_parameters()}
        def call(helper, model, x=x, y=y, v=v):
            return lambda: helper(model, loss_fn, x, y, v)

        fns = {"torch.nn jvp": call(manual_grad.loss_jvp, theirs),
               "manual_grad jvp": call(manual_grad.loss_jvp, ours),
               "torch.nn hvp": call(manual_grad.loss_hvp, theirs),
               "manual_grad hvp": call(manual_grad.loss_hvp, ours)}
        with sdpa_kernel(SDPBackend.MATH):
            times = interleaved(fns, cpu, repeats=args.repeats)
        rows.append([name] + [ms(times.median(n)) for n in fns] + [
            f"{times.ratio('manual_grad jvp', 'torch.nn jvp'):.2f}",
            f"{times.ratio('manual_grad hvp', 'torch.nn hvp'):.2f}"])
    table("Forward mode: loss jvp and Hessian-vector product, ms and ratio to torch.nn",
          ["model", "torch.nn jvp", "manual_grad jvp", "torch.nn hvp", "manual_grad hvp",
           "jvp ratio", "hvp ratio"], rows, cpu, "forward_ad")


if __name__ == "__main__":
    main()
