"""Train the seed's network (784 -> 50 -> ReLU -> 1, MSE) on MNIST with Lightning.

    python train.py fit --config configs/mnist_regression.yaml
    python train.py fit --config configs/mnist_regression.yaml --model.impl native
    python train.py fit --config configs/mnist_regression.yaml --ckpt_path last   # resume
    python train.py test --config configs/mnist_regression.yaml --ckpt_path best
    python train.py fit --print_config                                            # all options
"""

from manual_grad.training.cli import main

if __name__ == "__main__":
    main()
