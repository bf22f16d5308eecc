"""Attention's peak memory and time, forward + backward, against torch's on the CPU.

Contenders, one head size and batch, sequence length T = L = S from 256 to 4096:
- torch's F.scaled_dot_product_attention on its math backend (the one that runs on
  every device, and the one autograd differentiates op by op);
- manual_grad.functional.scaled_dot_product_attention (chunked over query rows by size);
- torch.nn.MultiheadAttention and manual_grad.MultiheadAttention, need_weights=False.

Peak memory is the most bytes of tensors alive at once during forward and backward,
beyond the inputs and parameters (counted by a TorchDispatchMode that sees every tensor
each op makes, and when it is freed; torch keeps no allocator statistics on the CPU).
Times are medians of interleaved rounds, ratios per round (bench/common.py).

    python -m bench.attention            # prints the table
    python -m bench.attention --save     # and writes bench/results/attention-cpu.md
"""

import argparse
import weakref

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import manual_grad
from bench.common import add_save_flag, interleaved, ms, table
from manual_grad import functional as MF


class PeakBytes(TorchDispatchMode):
    """The most bytes of storages made under this mode that were alive at one time."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def peak_bytes(step) -> int:
    with PeakBytes() as mode:
        step()
    return mode.peak


def contenders(T: int, heads: int = 4, dim: int = 32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, dim, requires_grad=True) for _ in range(3))
    x = torch.randn(1, T, heads * dim, requires_grad=True)
    theirs = nn.MultiheadAttention(heads * dim, heads, batch_first=True)
    ours = manual_grad.convert(theirs).model

    def torch_math():
        with sdpa_kernel(SDPBackend.MATH):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True
                                                             ).sum().backward()

    def manual():
        MF.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def mha(module):
        def step():
            with sdpa_kernel(SDPBackend.MATH):
                module(x, x, x, need_weights=False)[0].sum().backward()
        return step

    return {"torch sdpa (math)": torch_math, "manual_grad sdpa": manual,
            "torch.nn MHA": mha(theirs), "manual_grad MHA": mha(ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = add_save_flag(parser).parse_args()
    cpu = torch.device("cpu")
    rows = []
    for T in args.lengths:
        fns = contenders(T)
        mib = {name: peak_bytes(fn) / 2**20 for name, fn in fns.items()}
        times = interleaved(fns, cpu, repeats=args.repeats, warmup=1)
        rows.append([str(T)] + [f"{mib[n]:.1f}" for n in fns] + [
            ms(times.median(n)) for n in fns] + [
            f"{times.ratio('manual_grad sdpa', 'torch sdpa (math)'):.2f}",
            f"{times.ratio('manual_grad MHA', 'torch.nn MHA'):.2f}"])
    names = list(contenders(8))
    header = (["T"] + [f"{n} MiB" for n in names] + [f"{n} ms" for n in names]
              + ["sdpa time ratio", "MHA time ratio"])
    table("Attention, causal, 4 heads of 32, forward + backward: peak memory and time",
          header, rows, cpu, "attention")


if __name__ == "__main__":
    main()
