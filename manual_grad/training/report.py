"""A callback that closes a run with a summary line and a picture of its loss curve."""

import csv
import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class RunReport(L.Callback):
    """Times the training this process does; at the end of fit, writes ``loss_curve.png``
    beside the logger's ``metrics.csv`` and prints one line: the final validation loss
    (val_mse for the regressor, val_loss for the classifiers), val_acc, seconds per epoch
    of training, and the data when it is a fallback (or "no validation ran" in place of
    the two metrics when none was computed)."""

    def __init__(self) -> None:
        self.train_seconds = 0.0  # training time of this process (a resumed run: since then)
        self.epochs_trained = 0.0  # epochs trained by this process, a partial one in part
        self._start: float | None = None
        self._batches = 0
        # how far into the last epoch training got (batches of it, counted from the
        # epoch's start also when resumed mid-epoch), and the epoch's length
        self._reached, self._length = 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch enters that epoch without on_train_epoch_start
        self.train_seconds, self.epochs_trained = 0.0, 0.0
        self._start, self._batches = time.perf_counter(), 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        self._batches += 1
        self._reached = batch_idx + 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        self.train_seconds += time.perf_counter() - self._start
        total = trainer.num_training_batches
        share = self._batches / total if isinstance(total, int) and total > 0 else 1.0
        self.epochs_trained += min(share, 1.0)
        self._length = total if isinstance(total, int) else 0
        self._start = None

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metric = getattr(pl_module, "metric", "mse")
        data = data_label(trainer)
        bad = next((cb.first_bad_step for cb in trainer.callbacks
                    if getattr(cb, "first_bad_step", None) is not None), None)
        picture = self._plot(trainer, metric, data, bad)
        # a stop mid-epoch (max_steps, say) counts that epoch in current_epoch: it is
        # named as the part it is
        short = 0 < self._reached < self._length
        epochs = trainer.current_epoch - 1 if short else trainer.current_epoch
        done = f"{epochs} epoch{'' if epochs == 1 else 's'}" + (
            f" and {self._reached} of the next one's {self._length} batches" if short else "")
        if short and epochs == 0:
            done = f"{self._reached} of the first epoch's {self._length} batches"
        # only what was measured: a run without validation (limit_val_batches=0, or no
        # validation split) says so rather than printing val_mse=nan
        shown = [f"{name}={metrics[name]:.4f}" for name in (f"val_{metric}", "val_acc")
                 if name in metrics]
        timing = (f"{self.train_seconds / self.epochs_trained:.3f} s/epoch of training"
                  if self.epochs_trained > 0 else "no training in this process")
        if trainer.ckpt_path is not None and self.epochs_trained > 0:
            timing += f" over the {self.epochs_trained:.2f} epochs trained since the resume"
        print(
            f"manual_grad: finished {done}"
            + (f" on {data}" if data else "") + ": "
            + (" ".join(shown) if shown else "no validation ran")
            + f" ({timing})"
            + (f"; the training loss was NaN or Inf from step {bad}" if bad is not None
               else "")
            + (f"; loss curve: {picture}" if picture else ""),
            flush=True,
        )

    @staticmethod
    def _plot(trainer: L.Trainer, metric: str, data: str | None,
              bad: int | None) -> Path | None:
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
        title = (f"{trainer.lightning_module.__class__.__name__} "
                 f"({getattr(trainer.lightning_module, 'impl', '')})")
        if data:
            title += f"\non {data}"
        ax.set_title(title)
        if bad is not None or any(not math.isfinite(v) for points in series.values()
                                  for _, v in points):
            ax.text(0.5, 0.5, "the loss was NaN or Inf" + (f" from step {bad}" if bad else "")
                    + ":\nthose points are not drawn", transform=ax.transAxes,
                    ha="center", va="center", color="red")
        ax.grid(alpha=0.3)
        ax.legend()
        out = Path(log_dir) / "loss_curve.png"
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out


def data_label(trainer: L.Trainer) -> str | None:
    """The data a run used when it is not the one asked for (the offline fallback)."""
    data = trainer.datamodule
    source, asked = getattr(data, "source", None), getattr(data, "hparams", {}).get("dataset")
    if source is None or source == asked:
        return None
    return ("scikit-learn's 8x8 digits" if source == "digits" else source) + \
        f" (fallback: {asked} was not found)"
