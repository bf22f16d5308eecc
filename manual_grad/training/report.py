"""A callback that closes a run with a summary line and a picture of its loss curve."""

import csv
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class RunReport(L.Callback):
    """Times training epochs; at the end of fit, writes ``loss_curve.png`` beside the
    logger's ``metrics.csv`` and prints one line: the final validation loss (val_mse for
    the regressor, val_loss for the classifiers), val_acc and seconds per epoch (or "no
    validation ran" in place of the two metrics when none was computed)."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metric = getattr(pl_module, "metric", "mse")
        per_epoch = (sum(self.epoch_seconds) / len(self.epoch_seconds)
                     if self.epoch_seconds else float("nan"))
        picture = self._plot(trainer, metric)
        epochs = trainer.current_epoch
        # only what was measured: a run without validation (limit_val_batches=0, or no
        # validation split) says so rather than printing val_mse=nan
        shown = [f"{name}={metrics[name]:.4f}" for name in (f"val_{metric}", "val_acc")
                 if name in metrics]
        print(
            f"manual_grad: finished {epochs} epoch{'' if epochs == 1 else 's'}: "
            + (" ".join(shown) if shown else "no validation ran")
            + f" ({per_epoch:.3f} s/epoch of training)"
            + (f"; loss curve: {picture}" if picture else ""),
            flush=True,
        )

    @staticmethod
    def _plot(trainer: L.Trainer, metric: str) -> Path | None:
        # logger.log_dir, not trainer.log_dir: the latter is a collective call under DDP,
        # and this runs on rank 0 alone
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir is None:
            return None
        trainer.logger.save()
        csv_path = Path(log_dir) / "metrics.csv"
        if not csv_path.is_file():
            return None
        series: dict[str, list[tuple[int, float]]] = {f"train_{metric}": [], f"val_{metric}": []}
        with csv_path.open() as f:
            for row in csv.DictReader(f):
                for name, points in series.items():
                    if row.get(name):
                        points.append((int(row["epoch"]), float(row[name])))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in series.items():
            if points:
                ax.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o",
                        label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean squared error" if metric == "mse" else "cross-entropy")
        ax.set_title(f"{trainer.lightning_module.__class__.__name__} "
                     f"({getattr(trainer.lightning_module, 'impl', '')})")
        ax.grid(alpha=0.3)
        ax.legend()
        out = Path(log_dir) / "loss_curve.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out
