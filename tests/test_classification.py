"""The classification configs: an MLP and a CNN through train.py, manual against native."""

import os
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from manual_grad.training import MNISTClassifier, MNISTConvNet, MNISTDataModule
from manual_grad.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
T10K = Path(os.environ.get("MNIST_T10K_DIR", ROOT.parent / "shared" / "data" / "mnist-t10k"))


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def fit(model_cls, data_dir, impl, epochs=2, val_size=16, batch_size=16, **kwargs):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=batch_size, val_size=val_size,
                         download=False)
    model = model_cls(in_features=dm.in_features, impl=impl, **kwargs)
    rec = StepLosses()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[rec], precision=64)
    trainer.fit(model, dm)
    return trainer, model, torch.tensor(rec.losses, dtype=torch.float64)


@pytest.mark.parametrize("model_cls", [MNISTClassifier, MNISTConvNet],
                         ids=["mlp-classifier", "cnn"])
def test_manual_and_native_classifiers_take_the_same_steps(model_cls, tiny_mnist):
    _, manual, curve_m = fit(model_cls, tiny_mnist, "manual")
    _, native, curve_n = fit(model_cls, tiny_mnist, "native")
    assert len(curve_m) == 10
    torch.testing.assert_close(curve_m, curve_n, rtol=1e-6, atol=0)
    torch.testing.assert_close(manual.state_dict(), native.state_dict(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("config", ["mnist_classification", "mnist_cnn"])
def test_classification_configs_run_through_train_py(config, tiny_mnist, tmp_path,
                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = main(["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
                "--data.data_dir", str(tiny_mnist), "--data.val_size", "16",
                "--data.batch_size", "16", "--trainer.max_epochs", "1",
                "--trainer.enable_progress_bar", "false"])
    assert type(cli.model).__name__ == {"mnist_classification": "MNISTClassifier",
                                        "mnist_cnn": "MNISTConvNet"}[config]
    assert "manual_grad: finished 1 epoch: val_loss=" in capsys.readouterr().out
    header = next((tmp_path / "runs" / config).glob("version_0/metrics.csv")).read_text()
    assert {"train_loss", "val_loss", "val_acc"} <= set(header.splitlines()[0].split(","))


@pytest.mark.skipif(not T10K.is_dir(), reason=f"real MNIST test set not found in {T10K}")
@pytest.mark.parametrize(("model_cls", "epochs", "kwargs"),
                         [(MNISTClassifier, 3, {"optimizer": lambda p: torch.optim.SGD(p, 0.1)}),
                          (MNISTConvNet, 1, {"optimizer": lambda p: torch.optim.SGD(
                              p, 0.05, momentum=0.9)})], ids=["mlp-classifier", "cnn"])
def test_real_digits_are_classified_as_well_as_native(model_cls, epochs, kwargs, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copy(T10K / f"t10k-{kind}-ubyte.gz", raw / f"train-{kind}-ubyte.gz")
    accs = []
    for impl in ("manual", "native"):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tmp_path), val_size=2000, download=False,
                             fallback=None)
        model = model_cls(in_features=784, impl=impl, **kwargs)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False)
        trainer.fit(model, dm)
        accs.append(float(trainer.callback_metrics["val_acc"]))
    assert accs[0] > 0.9
    assert abs(accs[0] - accs[1]) <= 0.01  # within a point of native's
