"""Whole training steps of real models, converted by manual_grad against torch.nn.

Each model is built with random weights, converted with ``manual_grad.convert`` (the
same parameters), and each takes one SGD step (forward, backward, step) per turn on the
same batch: interleaved rounds, the ratio being the median of the per-round ratios
(bench/common.py).

- resnet18 (torchvision), batch 8 at 64 x 64, cross-entropy;
- a small GPT: 4 pre-norm nn.TransformerEncoderLayers, d = 128, 4 heads, T = 64, causal,
  batch 8, with token and position embeddings and a tied-free head, cross-entropy;
- the CNN of configs/mnist_cnn.yaml (MNISTConvNet), batch 64 of 28 x 28.

Beside the times, each step's memory (``step_memory``): the peak on a GPU, and on the
CPU the bytes kept for backward.

    python -m bench.models            # prints the table
    python -m bench.models --save     # and writes bench/results/models-cpu.md (and -cuda)
"""

import argparse
from collections.abc import Callable

import torch
from torch import nn

import manual_grad
from bench.common import add_save_flag, devices, interleaved, ms, table


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4,
                 T: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        x = self.blocks(x, mask=self.mask, is_causal=True)
        return self.head(self.norm(x)).flatten(0, 1)


def builds(device: torch.device) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    import torchvision

    from manual_grad.training import MNISTConvNet

    torch.manual_seed(0)
    out = [("resnet18, batch 8, 64 x 64", torchvision.models.resnet18(num_classes=10),
            torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))),
           ("GPT, 4 layers, d 128, T 64, batch 8", TinyGPT(),
            torch.randint(0, 512, (8, 64)), torch.randint(0, 512, (8 * 64,)))]
    cnn = MNISTConvNet(impl="native").net  # the CNN's layers, as torch.nn
    out.append(("mnist_cnn.yaml's CNN, batch 64", nn.Sequential(nn.Unflatten(1, (1, 28, 28)),
                                                                 cnn),
                torch.randn(64, 784), torch.randint(0, 10, (64,))))
    return [(n, m.to(device), x.to(device), y.to(device)) for n, m, x, y in out]


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         loss_fn: nn.Module) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return run


def step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                loss_fn: nn.Module) -> int:
    """Bytes of one forward + backward: on CUDA the peak allocated above what was there
    before; on the CPU, where torch keeps no allocator statistics, the bytes autograd
    keeps alive for backward (every saved tensor's storage, counted once; the batch and
    the parameters, there anyway, left out): the part of the peak a layer controls."""
    device = x.device
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    theirs = {t.untyped_storage().data_ptr() for t in (x, y, *model.parameters(),
                                                        *model.buffers())}
    return sum(v for k, v in saved.items() if k not in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = add_save_flag(parser).parse_args()
    for device in devices():
        rows = []
        for name, theirs, x, y in builds(device):
            report = manual_grad.convert(theirs)
            fns = {"torch.nn": step(theirs, x, y, nn.CrossEntropyLoss()),
                   "manual_grad": step(report.model, x, y, manual_grad.CrossEntropyLoss())}
            times = interleaved(fns, device, repeats=args.repeats)
            memory = [step_memory(m, x, y, loss()) for m, loss in (
                (theirs, nn.CrossEntropyLoss), (report.model, manual_grad.CrossEntropyLoss))]
            rows.append([name, f"{report.coverage()[0]:.0%}", ms(times.median("torch.nn")),
                         ms(times.median("manual_grad")),
                         f"{times.ratio('manual_grad', 'torch.nn'):.2f}",
                         f"{memory[0] / 2**20:.1f}", f"{memory[1] / 2**20:.1f}",
                         f"{memory[1] / memory[0]:.2f}"])
        what = "peak MiB" if device.type == "cuda" else "saved MiB"
        table("Training steps of real models: manual_grad (converted) against torch.nn",
              ["model", "hand-derived params", "torch.nn ms", "manual_grad ms", "ratio",
               f"torch.nn {what}", f"manual_grad {what}", "memory ratio"],
              rows, device, "models")


if __name__ == "__main__":
    main()
