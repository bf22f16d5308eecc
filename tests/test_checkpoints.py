"""Checkpoints: loaded without running code, interchangeable between implementations,
refused with a clear message when broken, and never replaced by a broken one."""

import os
import sys
from pathlib import Path

import pytest
import torch

import manual_grad
from manual_grad.training import CheckpointError, SafeCheckpointIO
from manual_grad.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnist_regression.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])


def common(data_dir):
    return ["--config", CONFIG, "--data.data_dir", str(data_dir), "--data.val_size", "16",
            "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]


def trained(tiny_mnist, impl="manual", epochs="1"):
    cli = main(["fit", *common(tiny_mnist), "--model.impl", impl,
                "--trainer.max_epochs", epochs])
    ckpt = Path("runs/mnist_regression/checkpoints/last.ckpt").resolve()
    return cli, ckpt


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # what an attacker's pickle would run on load


def test_our_checkpoints_load_with_weights_only(tiny_mnist):
    _, ckpt = trained(tiny_mnist)
    state = torch.load(ckpt, weights_only=True)
    assert set(state["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                        "net.2.bias"}


def test_native_checkpoint_runs_as_manual_and_back(tiny_mnist):
    for trained_as, runs_as in (("native", "manual"), ("manual", "native")):
        fitted, ckpt = trained(tiny_mnist, impl=trained_as)
        expected = fitted.trainer.callback_metrics["val_mse"]
        checked = main(["validate", *common(tiny_mnist), "--model.impl", runs_as,
                        "--ckpt_path", str(ckpt)])
        layer = checked.model.net[0]
        assert isinstance(layer, manual_grad.Linear) == (runs_as == "manual")
        torch.testing.assert_close(checked.trainer.callback_metrics["val_mse"], expected)
        resumed = main(["fit", *common(tiny_mnist), "--model.impl", runs_as,
                        "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)])
        assert resumed.trainer.global_step == 10 and resumed.model.impl == runs_as
        for f in Path("runs").rglob("*"):  # a clean slate for the other direction
            if f.is_file():
                f.unlink()


def test_a_float64_checkpoint_comes_back_with_every_bit(tiny_mnist):
    """validate / test / resume under precision 64 get the float64 weights that fit saved,
    not weights rounded through float32 on the way in (Lightning loads before it converts
    the module)."""
    fitted = main(["fit", *common(tiny_mnist), "--trainer.max_epochs", "1",
                   "--trainer.precision", "64"])
    ckpt = Path("runs/mnist_regression/checkpoints/last.ckpt").resolve()
    # (on CPU: Lightning hands the module back on CPU after a GPU run ends)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float64 for t in saved.values())
    checked = main(["validate", *common(tiny_mnist), "--trainer.precision", "64",
                    "--ckpt_path", str(ckpt)])
    for name, tensor in checked.model.state_dict().items():
        assert torch.equal(tensor.cpu(), saved[name]), name
    assert (checked.trainer.callback_metrics["val_mse"].item()
            == fitted.trainer.callback_metrics["val_mse"].item())
    # and a resumed run ends where an uninterrupted one does, bit for bit
    resumed = main(["fit", *common(tiny_mnist), "--trainer.max_epochs", "2",
                    "--trainer.precision", "64", "--ckpt_path", str(ckpt)])
    straight = main(["fit", *common(tiny_mnist), "--trainer.max_epochs", "2",
                     "--trainer.precision", "64"])
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name].cpu(), tensor.cpu()), name


def test_tampered_checkpoint_is_refused_and_runs_no_code(tiny_mnist, tmp_path, capsys):
    _, ckpt = trained(tiny_mnist)
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra"] = Payload(str(marker))
    tampered = tmp_path / "tampered.ckpt"
    torch.save(state, tampered)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *common(tiny_mnist), "--ckpt_path", str(tampered)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "tampered.ckpt" in err and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # the trainer's own loading path refuses it too
        SafeCheckpointIO().load_checkpoint(tampered)
    assert not marker.exists()


def test_truncated_checkpoint_gives_a_clear_error_and_changes_nothing(tiny_mnist, capsys):
    _, ckpt = trained(tiny_mnist)
    good = ckpt.parent / "good-copy.ckpt"
    good.write_bytes(ckpt.read_bytes())
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in ckpt.parent.iterdir()}
    with pytest.raises(SystemExit):
        main(["fit", *common(tiny_mnist), "--trainer.max_epochs", "2",
              "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert f"cannot load checkpoint {ckpt}" in err and "good-copy.ckpt" in err
    # 'last' reaches the same check, in one line too, before the trainer starts
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *common(tiny_mnist), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: cannot load checkpoint") and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in ckpt.parent.iterdir()}
    assert after == before  # nothing written over, nothing added


def test_nan_weights_never_replace_a_good_checkpoint(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    good = path.read_bytes()
    with pytest.warns(UserWarning, match=r"not saving .*last.ckpt: w hold NaN or Inf"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])},
                            "epoch": 2}, path)
    assert path.read_bytes() == good
    assert io.load_checkpoint(path)["epoch"] == 1
