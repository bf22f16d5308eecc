"""One training epoch through train.py's Lightning path against a plain PyTorch loop on the
same data (60,000 synthetic MNIST-shaped images written as IDX files, so the real loading
path runs), batch 64 and 4096, manual_grad layers. A plain-loop epoch runs right after
each Lightning epoch, and the ratio is the median over epochs of each pair's ratio. On a
GPU, rows with ``model.cuda_graph`` (each step replayed as one CUDA graph) are added.

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

from bench.common import add_save_flag, devices, ms, sync, table
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


class PlainLoop:
    """The same model and data trained by a plain PyTorch loop, one epoch per call."""

    def __init__(self, data_dir: str, batch: int, device: torch.device) -> None:
        L.seed_everything(0, verbose=False)
        dm = MNISTDataModule(data_dir=data_dir, batch_size=batch, download=False)
        dm.setup("fit")
        self.X, self.Y = (t.to(device) for t in dm.splits["train"])
        self.model = MNISTRegressor(in_features=784).to(device)
        self.opt = self.model.configure_optimizers()
        self.batch, self.device = batch, device

    def epoch(self) -> float:
        model, opt, X, Y = self.model, self.opt, self.X, self.Y
        sync(self.device)
        start = time.perf_counter()
        for idx in torch.randperm(len(X), device=self.device).split(self.batch):
            opt.zero_grad(set_to_none=True)
            loss = model.loss_fn(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
        sync(self.device)
        return time.perf_counter() - start


class PlainEpochAfterEach(L.Callback):
    """Runs one plain-loop epoch right after each Lightning epoch (after RunReport has
    timed it), so each pair of epochs meets the machine at the same speed."""

    def __init__(self, plain: PlainLoop) -> None:
        self.plain, self.seconds = plain, []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(self.plain.epoch())


def paired_epochs(data_dir: str, batch: int, device: torch.device, epochs: int,
                  steps_per_batch: int, cuda_graph: bool = False) -> tuple[float, float, float]:
    """(median train.py epoch, median plain epoch, median of their per-epoch ratios)."""
    plain = PlainEpochAfterEach(PlainLoop(data_dir, batch, device))
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
                            callbacks=[report, plain])
        trainer.fit(MNISTRegressor(in_features=784, steps_per_batch=steps_per_batch,
                                   cuda_graph=cuda_graph), dm)
    light, base = report.epoch_seconds[1:], plain.seconds[1:]  # the first epochs warm up
    return (statistics.median(light), statistics.median(base),
            statistics.median(a / b for a, b in zip(light, base, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--steps-per-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--cuda-graph-steps", type=int, nargs="*", default=[64],
                        help="on CUDA, also rows with model.cuda_graph at these "
                             "data.steps_per_batch (none: no such rows)")
    args = add_save_flag(parser).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_mnist(Path(tmp), 60_000)
        for device in devices():
            rows = []
            runs = [(k, False) for k in args.steps_per_batch]
            if device.type == "cuda":
                runs += [(k, True) for k in args.cuda_graph_steps]
            for batch in args.batches:
                for k, graph in runs:
                    light, plain, ratio = paired_epochs(tmp, batch, device, args.epochs, k,
                                                        graph)
                    rows.append([str(batch), str(k), "yes" if graph else "no", ms(plain),
                                 ms(light), f"{ratio:.3f}"])
            table("Epoch of 50,000 images: train.py (Lightning, resident data) vs a plain loop",
                  ["batch", "data.steps_per_batch", "model.cuda_graph", "plain loop ms",
                   "train.py ms", "ratio"], rows, device, "lightning_epoch")


if __name__ == "__main__":
    main()
