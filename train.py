"""Train the seed's network (784 -> 50 -> ReLU -> 1, MSE) on MNIST with Lightning.

    python train.py fit --config configs/mnist_regression.yaml
    python train.py fit --config configs/mnist_regression.yaml --model.impl native
    python train.py fit --config configs/mnist_regression.yaml --ckpt_path last   # resume
    python train.py validate --config configs/mnist_regression.yaml --ckpt_path best
    python train.py test --config configs/mnist_regression.yaml --ckpt_path best
    python train.py fit --config configs/mnist_regression.yaml --trainer.default_root_dir out
    python train.py fit --config configs/mnist_regression.yaml --print_config   # all options

Everything a run writes lands in runs/mnist_regression/ (runs/mnist_regression-digits/
when MNIST is absent and the bundled 8x8 digits stand in); see docs/training.md.
"""

from manual_grad.training.cli import main

if __name__ == "__main__":
    main()
