"""Checkpoint files that are safe to load and never replace a good one with a broken one."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: truncated, corrupt, or carrying code."""


def check_checkpoint(path: _PATH) -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True``, or raise a :class:`CheckpointError` that
    names the file, says why, and lists the other checkpoints beside it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several types for a bad file; all mean the same
        folder = Path(path).parent
        others = sorted(p.name for p in folder.glob("*.ckpt") if p != Path(path))
        reason = str(err).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"cannot load checkpoint {path}: {reason}. It is truncated, corrupt, or holds "
            "objects other than tensors and plain values (refused: loading them could run "
            "code). "
            + (f"Other checkpoints in {folder}: {', '.join(others)}. " if others else "")
            + "Pass one of them with --ckpt_path, or start without it."
        ) from err


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save / torch.load checkpoint IO, made strict in both directions.

    - Loading uses ``weights_only=True`` whatever the caller asked (no arbitrary code from
      an untrusted file) and turns an unreadable file into a :class:`CheckpointError`.
    - Saving refuses a model whose weights hold NaN or Inf: the previous file at that path
      (the last good checkpoint) is kept and a warning says so. Lightning already writes
      each file in one transaction, so an interrupted save leaves the old file whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        broken = [name for name, value in checkpoint.get("state_dict", {}).items()
                  if torch.is_tensor(value) and value.is_floating_point()
                  and not bool(torch.isfinite(value).all())]
        if broken:
            kept = (f"the file already at {path} is unchanged" if Path(path).is_file()
                    else "no checkpoint was written")
            rank_zero_warn(f"not saving {path}: {', '.join(broken[:3])} hold NaN or Inf; "
                           f"{kept}. Lower the learning rate.")
            return
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: _PATH, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return check_checkpoint(path)


class RestoresAsConfigured:
    """A LightningModule mixin: a checkpoint restores into the model as this run is
    configured, not as the run that saved it was.

    - The module is converted to the precision plugin's dtype before the weights load.
      Lightning restores a checkpoint's weights before the strategy's setup converts the
      module (``Trainer._run``), so under ``precision: 64`` a float64 checkpoint was copied
      into float32 parameters, rounded, and only then made float64 again: a resumed or
      validated run no longer had the weights it saved (val_mse 5.49021904919 after fit,
      5.49021905297 from its checkpoint).
    - The optimiser steps with the settings given now (lr, momentum...), not those saved,
      which Lightning would otherwise restore over them: "lower the learning rate and
      resume" must lower it. The optimiser's state (momentum buffers) is kept. With an LR
      scheduler the saved rates stand: the schedule sets them.

    Needs ``self.optimizer_factory``, the ``params -> Optimizer`` the run was given.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision

        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        try:
            plugin = self.trainer.precision_plugin  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer (load_from_checkpoint)
            plugin = None
        if type(plugin) in (DoublePrecision, HalfPrecision):
            plugin.convert_module(self)
        self._use_configured_optimizer(checkpoint)

    def _use_configured_optimizer(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or checkpoint.get("lr_schedulers"):
            return
        fresh = self.optimizer_factory(self.parameters()).param_groups  # type: ignore[attr-defined]
        saved = states[0].get("param_groups", [])
        if len(saved) != len(fresh):
            return
        changed = {}
        for now, then in zip(fresh, saved, strict=True):
            for key, value in now.items():
                if key != "params" and key in then and then[key] != value:
                    changed[key] = (then[key], value)
                    then[key] = value
        if changed:
            rank_zero_info("manual_grad: resuming with the optimiser settings given now: " +
                           ", ".join(f"{k}={new!r} (the checkpoint had {old!r})"
                                     for k, (old, new) in changed.items()))
