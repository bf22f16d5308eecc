"""Train the seed's network on MNIST with Lightning.

    python train.py fit --config configs/mnist_regression.yaml
    python train.py fit --config configs/mnist_regression.yaml --model.impl native
    python train.py fit --config configs/mnist_regression.yaml --ckpt_path last   # resume
    python train.py test --config configs/mnist_regression.yaml --ckpt_path best
"""

from lightning.pytorch.cli import LightningCLI

from manual_grad.training import MNISTDataModule, MNISTRegressor


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the model's input width follows the data actually loaded (784, or 64 offline)
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")


def main() -> None:
    CLI(MNISTRegressor, MNISTDataModule, seed_everything_default=0)


if __name__ == "__main__":
    main()
