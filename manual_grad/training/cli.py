"""The LightningCLI behind train.py."""

from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from manual_grad.training.checkpoint_io import CheckpointError, check_checkpoint
from manual_grad.training.data import MNISTDataModule
from manual_grad.training.models import DigitModel


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's input width follows the data actually loaded (784, or 64 offline)
        parser.link_arguments("data.in_features", "model.init_args.in_features",
                              apply_on="instantiate")
        # the data groups the batches, the model steps through each group
        parser.link_arguments("data.steps_per_batch", "model.init_args.steps_per_batch")

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a checkpoint file's hyperparameters right after parsing; a
        # broken or tampered file must end here with a message, not a traceback there.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                check_checkpoint(ckpt_path)
            except CheckpointError as err:
                parser.error(str(err))


def main(args: list[str] | None = None) -> CLI:
    """Run ``train.py`` with ``args`` (default: the command line)."""
    cli = CLI(DigitModel, MNISTDataModule, subclass_mode_model=True,
              seed_everything_default=0, args=args)
    # Lightning leaves a DDP run's process group alive; left to the interpreter's exit,
    # gloo's worker threads can abort the process (SIGABRT, "terminate called without an
    # active exception"). Destroyed here, on success only: after an error another rank may
    # still be inside a collective, and destroying would hang it.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return cli
