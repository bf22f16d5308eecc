"""One training epoch through train.py's Lightning path against a plain PyTorch loop on the
same data (60,000 synthetic MNIST-shaped images written as IDX files, so the real loading
path runs), batch 64 and 4096, manual_grad layers.

    python bench/lightning_epoch.py
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from bench.common import devices, ms, table
from manual_grad.training import MNISTDataModule, MNISTRegressor, RunReport


def write_synthetic_mnist(root: Path, n: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
    for name, t in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 8, t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
        (raw / name).write_bytes(header + t.numpy().tobytes())


def lightning_epoch(data_dir: str, batch: int, device: torch.device, epochs: int,
                    steps_per_batch: int = 1) -> float:
    L.seed_everything(0, verbose=False)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=batch, download=False,
                         steps_per_batch=steps_per_batch)
    report = RunReport()
    # as train.py's config runs it (CSV logger, progress bar), less what the plain loop
    # does not do either: validation and checkpoints
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(max_epochs=epochs, accelerator=device.type, devices=1,
                            logger=CSVLogger(logs, name="bench"), enable_checkpointing=False,
                            enable_model_summary=False, limit_val_batches=0,
                            callbacks=[report])
        trainer.fit(MNISTRegressor(in_features=784, steps_per_batch=steps_per_batch), dm)
    return statistics.median(report.epoch_seconds[1:])  # the first epoch warms up


def plain_epoch(data_dir: str, batch: int, device: torch.device, epochs: int) -> list[float]:
    L.seed_everything(0, verbose=False)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=batch, download=False)
    dm.setup("fit")
    X, Y = (t.to(device) for t in dm.splits["train"])
    model = MNISTRegressor(in_features=784).to(device)
    opt = model.configure_optimizers()
    times = []
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for idx in torch.randperm(len(X), device=device).split(batch):
            opt.zero_grad(set_to_none=True)
            loss = model.loss_fn(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--steps-per-batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_mnist(Path(tmp), 60_000)
        for device in devices():
            rows = []
            for batch in args.batches:
                # the plain loop runs before and after the Lightning runs: drift in the
                # machine's speed falls on both sides of the ratio
                before = plain_epoch(tmp, batch, device, args.epochs)
                light = {k: lightning_epoch(tmp, batch, device, args.epochs, k)
                         for k in args.steps_per_batch}
                plain = statistics.median(before + plain_epoch(tmp, batch, device, args.epochs))
                for k, t in light.items():
                    rows.append([str(batch), str(k), ms(plain), ms(t), f"{t / plain:.3f}"])
            table("Epoch of 50,000 images: train.py (Lightning, resident data) vs a plain loop",
                  ["batch", "data.steps_per_batch", "plain loop ms", "train.py ms", "ratio"],
                  rows, device, "lightning_epoch")


if __name__ == "__main__":
    main()
