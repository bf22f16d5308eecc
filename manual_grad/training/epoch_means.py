"""Epoch means of the step metrics, as ``self.log(..., on_epoch=True, batch_size=n)`` gives
them, for a fraction of the cost.

``self.log`` costs ~0.7 ms a call on a 2-core CPU, more than a whole batch-64 training step
of the seed's network. A running sum costs two small tensor ops and no host sync; the sums
are logged once, at the end of the stage's epoch. Under DDP the processes' sums and counts
are added in one all-reduce, so the mean is over every sample of every process. A
checkpoint saved mid-epoch carries the training sums, so a resumed epoch's mean is over
the whole epoch.
"""

from typing import Any

import torch
from torch import Tensor


class EpochMeans:
    """A LightningModule mixin: ``add_to_epoch_mean(stage, name, total, count)`` in a step,
    and the stage's means are logged when its epoch ends. Subclasses that override the
    ``on_*_epoch_start`` / ``on_*_epoch_end`` or checkpoint hooks call ``super()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # per stage ("train", "val", "test"): metric name -> (sum over samples, samples)
        self._epoch_sums: dict[str, dict[str, tuple[Tensor, int]]] = {}
        self._restored_epoch: int | None = None

    def add_to_epoch_mean(self, stage: str, name: str, total: Tensor, count: int) -> None:
        """Add ``total``, a metric summed over ``count`` samples, to its epoch mean."""
        # summed in float32 at least: a bfloat16 running sum has 8 significant bits
        total = total.to(torch.promote_types(total.dtype, torch.float32))
        sums = self._epoch_sums.setdefault(stage, {})
        if name in sums:
            old_total, old_count = sums[name]
            total, count = old_total + total, old_count + count
        sums[name] = (total, count)

    def _log_epoch_means(self, stage: str) -> None:
        sums = self._epoch_sums.pop(stage, {})
        if not sums:
            return
        names = list(sums)
        dtype = sums[names[0]][0].dtype
        totals = [sums[name][0] for name in names]
        counts: list[Any] = [sums[name][1] for name in names]
        if self.trainer.world_size > 1:
            # Under DDP the processes' totals and counts are summed here, in float64, in
            # one all-reduce. Lightning's own weighting (batch_size=count, sync_dist=True)
            # averages the counts as integers, and truncates: validation shares of 8 and
            # 7 samples gave the mean over 14 (lightning 2.6).
            packed = torch.stack([*(t.double() for t in totals),
                                  *(totals[0].new_tensor(c, dtype=torch.float64)
                                    for c in counts)])
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
            totals, counts = list(packed[: len(names)]), list(packed[len(names):])
        for name, total, count in zip(names, totals, counts, strict=True):
            # the mean over every process's samples, the same on each: sync_dist=True only
            # averages equal values (and keeps Lightning from warning that it is off)
            self.log(name, (total / count).to(dtype), prog_bar=True, batch_size=1,
                     sync_dist=True)

    # each stage starts from zero: an epoch cut short (an exception, Ctrl-C in a notebook)
    # must not leave its partial sums to the next one; an epoch resumed from a checkpoint
    # starts from the sums the checkpoint saved
    def on_train_epoch_start(self) -> None:
        if self._restored_epoch != self.current_epoch:
            self._epoch_sums.pop("train", None)
        self._restored_epoch = None

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._epoch_sums.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if "train" in self._epoch_sums:
            checkpoint["manual_grad_epoch_sums"] = {
                "epoch": self.current_epoch,
                "train": {name: [total, count]
                          for name, (total, count) in self._epoch_sums["train"].items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        saved = checkpoint.get("manual_grad_epoch_sums")
        self._restored_epoch = None
        if saved:
            self._epoch_sums["train"] = {name: (total.to(self.device), int(count))
                                         for name, (total, count) in saved["train"].items()}
            self._restored_epoch = saved["epoch"]
