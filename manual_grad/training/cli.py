"""The LightningCLI behind train.py."""

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from manual_grad.training.data import MNISTDataModule
from manual_grad.training.regressor import MNISTRegressor


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model's input width follows the data actually loaded (784, or 64 offline)
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")


def main(args: list[str] | None = None) -> CLI:
    """Run ``train.py`` with ``args`` (default: the command line)."""
    return CLI(MNISTRegressor, MNISTDataModule, seed_everything_default=0, args=args)
