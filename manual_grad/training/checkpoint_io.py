"""Checkpoint files that are safe to load and never replace a good one with a broken one."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn


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
