import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for comparing two float computations of the same math."""
    return {"rtol": 1e-12, "atol": 1e-12} if dtype in (torch.float64, torch.complex128) else {
        "rtol": 1e-5, "atol": 1e-6}


def write_idx(path, array, gz: bool = False) -> None:
    """Write a uint8 tensor as an IDX file (the format MNIST ships in)."""
    import gzip

    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_mnist_dir(root, n_train: int = 96, n_test: int = 32, seed: int = 0):
    """A tiny MNIST in torchvision's layout: root/MNIST/raw, train files gzipped."""
    gen = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = torch.randint(0, 10, (n,), generator=gen)
        # brightness grows with the label, so there is something to learn
        images = (torch.rand(n, 28, 28, generator=gen) * 25 * (labels.view(-1, 1, 1) + 1)).clamp(
            0, 255)
        suffix = ".gz" if gz else ""
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


@pytest.fixture
def tiny_mnist(tmp_path):
    return make_mnist_dir(tmp_path / "data")


def fit_grouped(data_dir, k: int, callbacks=(), **trainer_args):
    """Fit the tiny regressor on data_dir with data.steps_per_batch = k, on the CPU.

    Returns (trainer, model, choices): choices lists, for each grouped Lightning step,
    whether it took the plain inner step (True) or Lightning's manual_backward path."""
    import lightning as L

    from manual_grad.training import MNISTDataModule, MNISTRegressor

    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=16, val_size=16, download=False,
                         steps_per_batch=k)
    model = MNISTRegressor(in_features=784, hidden=12, steps_per_batch=k)
    choices: list[bool] = []
    decide = model._plain_inner_steps
    model._plain_inner_steps = lambda: choices.append(decide()) or choices[-1]
    trainer = L.Trainer(accelerator="cpu", enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=list(callbacks), **trainer_args)
    trainer.fit(model, dm)
    return trainer, model, choices


@pytest.fixture(autouse=True)
def _single_pass_always(monkeypatch) -> None:
    """The single-pass losses as such: on a machine where the measurement would choose
    the plain path for a test's shape, their tests would test that path instead.
    (test_single_pass's choice tests set "auto" themselves.)"""
    from manual_grad import functional

    monkeypatch.setattr(functional, "SINGLE_PASS", "always")


@pytest.fixture(autouse=True)
def _formulas_eager(monkeypatch) -> None:
    """The eager formulas: compiling one (functions/_fuse.py) takes seconds, and a test
    of a big enough tensor would pay them. tests/test_fuse.py tests the compiled ones."""
    from manual_grad.functions import _fuse

    monkeypatch.setattr(_fuse, "MODE", "never")
