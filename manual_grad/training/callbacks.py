"""The callbacks train.py adds to Lightning's: a stop on a non-finite loss, and checkpoints
whose names say only what was measured."""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class RunError(RuntimeError):
    """A run that cannot go on, for a reason one line can say; train.py prints that line
    (no traceback) and exits with status 1."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or Inf."""


def last_finite_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest checkpoint file this run saved or resumed from, if any: it holds finite
    weights (SafeCheckpointIO never writes NaN or Inf ones)."""
    candidates = [Path(cb.last_model_path) for cb in trainer.checkpoint_callbacks
                  if isinstance(cb, ModelCheckpoint) and cb.last_model_path]
    candidates += [Path(cb.best_model_path) for cb in trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.best_model_path]
    if trainer.ckpt_path:
        candidates.append(Path(trainer.ckpt_path))
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


class StopOnNonFinite(L.Callback):
    """Stop the run at the first training step whose loss is NaN or Inf.

    Args:
        stop: ``True`` (default) raises :class:`NonFiniteLossError` naming the step, the
            newest checkpoint with finite weights (if one exists) and the fix, and
            train.py exits with status 1. ``False`` trains on, as Lightning does by default,
            and the run's summary says from which step the loss was not finite.

    The check reads the loss once per Lightning step (one host sync; a group of
    ``data.steps_per_batch`` optimiser steps is checked as one, and the first bad step in it
    is named).
    """

    def __init__(self, stop: bool = True) -> None:
        self.stop = stop
        self.first_bad_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_bad_step is not None and not self.stop:
            return  # already reported; the run goes on as asked
        losses = None
        if isinstance(outputs, dict):
            losses = outputs.get("step_losses", outputs.get("loss"))
        elif isinstance(outputs, Tensor):
            losses = outputs
        if losses is None:
            return
        finite = torch.isfinite(losses.detach()).reshape(-1)
        if bool(finite.all()):
            return
        # global_step has counted every optimiser step of this batch; the first bad one:
        first = trainer.global_step - len(finite) + int((~finite).nonzero()[0]) + 1
        self.first_bad_step = first
        value = float(losses.detach().reshape(-1)[~finite][0])
        if not self.stop:
            rank_zero_warn(f"the training loss is {value} at step {first}; training on "
                           "(nan.stop is false)")
            return
        saved = last_finite_checkpoint(trainer)
        where = (f"the newest checkpoint with finite weights is {saved}" if saved is not None
                 else "this run wrote no checkpoint, so none holds its finite weights")
        raise NonFiniteLossError(
            f"the training loss became {value} at step {first} (epoch "
            f"{trainer.current_epoch}); {where}. Lower the learning rate (e.g. "
            "--model.optimizer.init_args.lr 0.001), or pass --nan.stop false to train on")

    def state_dict(self) -> dict[str, Any]:
        return {"first_bad_step": self.first_bad_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_bad_step = state_dict.get("first_bad_step")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with two changes.

    - The checkpoint saved when a run is interrupted (Ctrl-C, an error) is named
      ``interrupted-epoch=E-step=S.ckpt``: the usual template would write a validation
      metric that was not measured for these weights (Lightning fills a missing one
      with 0).
    - None is saved when the run stops for a non-finite loss: those weights are NaN.

    ``dirpath`` left empty is filled in by train.py: ``<run folder>/checkpoints``.
    """

    _interrupted = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, RunError):
            return
        self._interrupted = True
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self._interrupted = False

    def format_checkpoint_name(self, metrics: dict[str, Tensor], filename: str | None = None,
                               ver: int | None = None, prefix: str | None = None) -> str:
        if self._interrupted and filename is None:  # (last.ckpt passes its own filename)
            filename = "interrupted-{epoch}-{step}"
        return super().format_checkpoint_name(metrics, filename, ver, prefix)
