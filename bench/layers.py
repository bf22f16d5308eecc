"""Forward + backward of the layers real models use, manual_grad against torch.nn.

Each layer is built from torch.nn, converted with ``manual_grad.convert`` (the same
parameters), and both take turns on the same input and incoming gradient: interleaved
rounds, the ratio being the median of the per-round ratios (bench/common.py). Shapes are
those of resnet activations at batch 8 and of ViT/GPT activations at batch 16. Run at one
thread and at all of the machine's threads.

    python -m bench.layers            # prints the tables
    python -m bench.layers --save     # and writes bench/results/layers-cpu.md (and -cuda)
"""

import argparse
from collections.abc import Callable

import torch
from torch import nn

import manual_grad
from bench.common import add_save_flag, devices, interleaved, ms, table

Case = tuple[str, Callable[[], nn.Module], tuple[int, ...], str]

# name, torch.nn layer, input shape, where models use it
CASES: list[Case] = [
    ("GELU", nn.GELU, (16, 128, 1024), "GPT MLP"),
    ("LayerNorm", lambda: nn.LayerNorm(256), (16, 128, 256), "GPT"),
    ("BatchNorm2d (train)", lambda: nn.BatchNorm2d(64), (8, 64, 56, 56), "resnet stem"),
    ("BatchNorm1d (train)", lambda: nn.BatchNorm1d(256), (64, 256), "MLP"),
    ("GroupNorm", lambda: nn.GroupNorm(32, 64), (8, 64, 56, 56), "resnet-GN"),
    ("RMSNorm", lambda: nn.RMSNorm(256), (16, 128, 256), "LLaMA-style"),
    ("Conv2d 3x3", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (8, 64, 56, 56),
     "resnet block"),
    ("Conv2d 7x7/2", lambda: nn.Conv2d(3, 64, 7, 2, 3, bias=False), (8, 3, 224, 224),
     "resnet stem"),
    ("MaxPool2d 3/2", lambda: nn.MaxPool2d(3, 2, 1), (8, 64, 112, 112), "resnet stem"),
    ("AvgPool2d 2", lambda: nn.AvgPool2d(2), (8, 64, 56, 56), "densenet"),
    ("Softmax", lambda: nn.Softmax(-1), (16, 4, 128, 128), "attention scores"),
    ("LogSoftmax", lambda: nn.LogSoftmax(-1), (64, 1000), "classifier"),
    ("Linear", lambda: nn.Linear(256, 1024), (16, 128, 256), "GPT MLP"),
    ("MultiheadAttention", lambda: nn.MultiheadAttention(256, 4, batch_first=True),
     (16, 128, 256), "ViT/GPT"),
]


def forward_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor | None,
                     target: torch.Tensor | None = None) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        if isinstance(layer, nn.MultiheadAttention | manual_grad.MultiheadAttention):
            out = layer(x, x, x, need_weights=False)[0]
        elif target is not None:
            out = layer(x, target)
        else:
            out = layer(x)
        out.backward(g if g is not None else torch.ones_like(out))
    return step


def contenders(case: Case, device: torch.device) -> dict[str, Callable[[], None]]:
    name, make, shape, _ = case
    torch.manual_seed(0)
    theirs = make().to(device)
    ours = manual_grad.convert(theirs).model
    x = torch.randn(shape, device=device, requires_grad=True)
    with torch.no_grad():
        out = theirs(x, x, x, need_weights=False)[0] if name == "MultiheadAttention" \
            else theirs(x)
    g = torch.randn_like(out)
    return {"torch.nn": forward_backward(theirs, x, g), "manual_grad": forward_backward(ours, x, g)}


def embedding_and_loss(device: torch.device) -> list[tuple[str, str, dict]]:
    torch.manual_seed(0)
    emb = nn.Embedding(10000, 256).to(device)
    idx = torch.randint(0, 10000, (16, 128), device=device)
    ours_emb = manual_grad.convert(emb).model
    g = torch.randn(16, 128, 256, device=device)

    def emb_step(layer: nn.Module) -> Callable[[], None]:
        def step() -> None:
            layer.weight.grad = None
            layer(idx).backward(g)
        return step

    logits = torch.randn(64, 1000, device=device, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device=device)
    return [
        ("Embedding 10000 x 256", "GPT tokens",
         {"torch.nn": emb_step(emb), "manual_grad": emb_step(ours_emb)}),
        ("CrossEntropyLoss", "classifier",
         {"torch.nn": forward_backward(nn.CrossEntropyLoss(), logits, None, labels),
          "manual_grad": forward_backward(manual_grad.CrossEntropyLoss(), logits, None,
                                          labels)}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 25 rounds: a layer's step is ~0.1-1 ms here, and with 7 rounds one stray pause on a
    # shared machine moved a ratio by 0.3
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to run at (default: 1 and all)")
    args = add_save_flag(parser).parse_args()
    everything = torch.get_num_threads()
    for device in devices():
        counts = args.threads or ([1, everything] if everything > 1 else [1])
        if device.type == "cuda":
            counts = [everything]
        for threads in counts:
            torch.set_num_threads(threads)
            rows = []
            runs = [(c[0], c[3], contenders(c, device)) for c in CASES]
            runs += embedding_and_loss(device)
            for name, where, fns in runs:
                times = interleaved(fns, device, repeats=args.repeats)
                rows.append([name, where, ms(times.median("torch.nn")),
                             ms(times.median("manual_grad")),
                             f"{times.ratio('manual_grad', 'torch.nn'):.2f}"])
            table(f"Layers, forward + backward, {threads} thread(s): manual_grad against "
                  "torch.nn", ["layer", "used in", "torch.nn ms", "manual_grad ms", "ratio"],
                  rows, device, f"layers-{threads}t" if device.type == "cpu" else "layers")
    torch.set_num_threads(everything)


if __name__ == "__main__":
    main()
