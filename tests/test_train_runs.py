"""train.py as a new user meets it: datasets that change under a run, a loss that goes NaN,
interrupted and finished runs, --ckpt_path best, bad values, and where every artefact lands.
Each message checked here is one line that must be true of the run."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_mnist_dir

from manual_grad.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_regression.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    # main(args) runs as if from the command line, in a folder of its own
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.chdir(tmp_path)


def tiny(data_dir: Path) -> list[str]:
    return ["--config", str(CONFIG), "--data.data_dir", str(data_dir), "--data.val_size", "16",
            "--data.batch_size", "16", *QUIET]


def run_train(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"),
                                       os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=timeout)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("train.py")]
    assert lines, stderr[-3000:]
    return lines[-1]


class Crash(L.Callback):
    """Raise at the start of the step after ``at_step`` optimiser steps (a crash or Ctrl-C)."""

    def __init__(self, at_step: int = 7) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_the_fallback_runs_apart_from_real_mnist_and_a_mismatch_is_one_line(tmp_path, capsys,
                                                                             recwarn):
    # offline, no MNIST: the 8x8 digits, in a folder that says so
    offline = ["--config", str(CONFIG), "--data.data_dir", str(tmp_path / "none"),
               "--data.download", "false", "--trainer.max_epochs", "1", *QUIET]
    main(["fit", *offline])
    out = capsys.readouterr().out
    assert "finished 1 epoch on scikit-learn's 8x8 digits (fallback: mnist was not found)" in out
    assert any("data.val_size=10000 is more than" in str(w.message) for w in recwarn)
    fallback = tmp_path / "runs" / "mnist_regression-digits"
    assert (fallback / "checkpoints" / "last.ckpt").is_file()
    assert (fallback / "version_0" / "metrics.csv").is_file()
    # then the real files appear: `--ckpt_path last` finds no MNIST checkpoint, and says so
    data = make_mnist_dir(tmp_path / "data")
    before = files(fallback)
    resumed = main(["fit", *tiny(data), "--trainer.max_epochs", "1", "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "no checkpoint in" in out and "training from the start" in out
    assert "8x8" not in out and resumed.trainer.global_step == 5
    assert (tmp_path / "runs" / "mnist_regression" / "checkpoints" / "last.ckpt").is_file()
    # the fallback's checkpoint passed by hand: one line naming it and both shapes
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *tiny(data), "--ckpt_path",
              str(fallback / "checkpoints" / "last.ckpt")])
    assert exit_info.value.code == 1
    line = error_line(capsys.readouterr().err)
    assert "last.ckpt holds net.0.weight of shape (50, 64)" in line
    assert "this model's is (50, 784)" in line and "trained on digits data" in line
    assert files(fallback) == before  # nothing written there, nothing added


def test_a_checkpoint_of_other_data_of_the_same_shape_is_refused(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data")
    fashion = make_mnist_dir(tmp_path / "fashion")
    (fashion / "MNIST").rename(fashion / "FashionMNIST")
    main(["fit", *tiny(data), "--trainer.max_epochs", "1"])
    ckpt = tmp_path / "runs" / "mnist_regression" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        main(["fit", *tiny(fashion), "--data.dataset", "fashion_mnist", "--ckpt_path", str(ckpt)])
    line = error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} was trained on mnist data and this run's data is " \
           "fashion_mnist" in line
    # and its own runs go to a folder of their own
    main(["fit", *tiny(fashion), "--data.dataset", "fashion_mnist", "--trainer.max_epochs", "1"])
    assert (tmp_path / "runs" / "mnist_regression-fashion_mnist" / "checkpoints").is_dir()


def test_a_nan_run_stops_with_a_true_message_and_a_failing_exit(tmp_path):
    data = make_mnist_dir(tmp_path / "data")
    ckpts = tmp_path / "runs" / "mnist_regression" / "checkpoints"
    blow_up = ["--model.optimizer.init_args.lr", "1e3"]
    done = run_train("fit", *tiny(data), *blow_up, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = error_line(done.stderr)
    assert line.startswith("train.py: error: the training loss became")
    assert "at step" in line and "this run wrote no checkpoint" in line and "lr" in line
    assert not ckpts.exists() or not any(ckpts.iterdir())  # as the message says
    # one good epoch, then the same blow-up resumed from it: the message names that file
    assert run_train("fit", *tiny(data), "--trainer.max_epochs", "1",
                     cwd=tmp_path).returncode == 0
    good = (ckpts / "last.ckpt").read_bytes()
    done = run_train("fit", *tiny(data), *blow_up, "--trainer.max_epochs", "3", "--ckpt_path",
                     "last", cwd=tmp_path)
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert f"the newest checkpoint with finite weights is {ckpts.resolve() / 'last.ckpt'}" in line
    assert (ckpts / "last.ckpt").read_bytes() == good  # and they still are
    state = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    # --nan.stop false trains on, as Lightning would, and the summary says so
    done = run_train("fit", *tiny(data), *blow_up, "--trainer.max_epochs", "2", "--nan.stop",
                     "false", "--trainer.default_root_dir", "on", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the training loss was NaN or Inf from step" in done.stdout


def test_a_run_stopped_mid_epoch_says_how_far_it_got(tmp_path, capsys):
    """max_steps that ends inside an epoch: Lightning counts that epoch in current_epoch,
    and the summary once said "finished 2 epochs" and "since the resume" for 1.4 epochs
    of a run never resumed. It names the part epoch, and a resume only when there was
    one."""
    data = make_mnist_dir(tmp_path / "data")  # 5 steps an epoch
    main(["fit", *tiny(data), "--trainer.max_steps", "7", "--trainer.max_epochs", "3"])
    out = capsys.readouterr().out
    assert "manual_grad: finished 1 epoch and 2 of the next one's 5 batches:" in out
    assert "since the resume" not in out
    main(["fit", *tiny(data), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "manual_grad: finished 2 epochs:" in out and "since the resume" in out
    main(["fit", *tiny(data), "--trainer.max_steps", "3", "--trainer.default_root_dir",
          "first"])
    assert "manual_grad: finished 3 of the first epoch's 5 batches:" in capsys.readouterr().out


def test_an_interrupted_run_resumed_logs_what_an_uninterrupted_one_logs(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data")
    args = [*tiny(data), "--trainer.precision", "64", "--trainer.max_epochs", "2"]

    def epoch_rows(root: str) -> list[dict[str, str]]:
        rows = []
        for path in sorted((tmp_path / root / "mnist_regression").glob("version_*/metrics.csv")):
            with path.open() as f:
                rows += [r for r in csv.DictReader(f) if r.get("train_mse") or r.get("val_mse")]
        return rows

    main(["fit", *args, "--trainer.default_root_dir", "straight"])
    crash = '{"class_path": "test_train_runs.Crash", "init_args": {"at_step": 7}}'
    with pytest.raises(RuntimeError, match="simulated crash"):  # mid-epoch 1 (5 steps each)
        main(["fit", *args, "--trainer.default_root_dir", "cut", f"--trainer.callbacks+={crash}"])
    ckpts = tmp_path / "cut" / "mnist_regression" / "checkpoints"
    # named for what it is, with no validation metric it never measured
    assert (ckpts / "interrupted-epoch=1-step=7.ckpt").is_file()
    capsys.readouterr()
    main(["fit", *args, "--trainer.default_root_dir", "cut", "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "over the 0.60 epochs trained since the resume" in out  # 3 of the epoch's 5 steps
    straight, cut = epoch_rows("straight"), epoch_rows("cut")

    def by_epoch(rows, key):
        return {r["epoch"]: float(r[key]) for r in rows if r.get(key)}

    for key in ("train_mse", "val_mse", "val_acc"):
        assert by_epoch(cut, key) == pytest.approx(by_epoch(straight, key), rel=1e-12), key


def test_resuming_a_finished_run_says_so_and_leaves_nothing_behind(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data")
    main(["fit", *tiny(data), "--trainer.max_epochs", "1"])
    run = tmp_path / "runs" / "mnist_regression"
    before = files(run)
    capsys.readouterr()
    assert main(["fit", *tiny(data), "--trainer.max_epochs", "1", "--ckpt_path", "last"]) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("manual_grad: the run in ") and "already trained its 1 epochs" \
        in out[-1]
    assert files(run) == before and sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "version_0"]


def test_ckpt_path_best_works_for_fit_validate_and_test(tmp_path):
    data = make_mnist_dir(tmp_path / "data")
    first = main(["fit", *tiny(data), "--trainer.max_epochs", "3"])
    best = Path(first.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.name.startswith("epoch=")
    for sub in ("validate", "test"):
        cli = main([sub, *tiny(data), "--ckpt_path", "best"])
        assert Path(cli.trainer.ckpt_path) == best
    resumed = main(["fit", *tiny(data), "--trainer.max_epochs", "4", "--ckpt_path", "best"])
    assert Path(resumed.trainer.ckpt_path) == best and resumed.trainer.global_step == 20


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["--model.hidden", "0"], "--model.hidden must be an integer >= 1, got 0"),
        (["--model.hidden", "-3"], "--model.hidden must be an integer >= 1, got -3"),
        (["--data.batch_size", "-1"], "--data.batch_size must be an integer >= 1, got -1"),
        (["--data.val_size", "0"], "--data.val_size must be an integer >= 1, got 0"),
        (["--data.steps_per_batch", "0"], "--data.steps_per_batch must be an integer >= 1"),
        (["--model.optimizer.init_args.lr", "-0.1"], "--model.optimizer.lr must be a finite "
                                                     "number > 0, got -0.1"),
        (["--model.optimizer.init_args.lr", "0"], "--model.optimizer.lr must be a finite "
                                                  "number > 0, got 0"),
        (["--model.optimizer.init_args.lr", "nan"], "model.optimizer.lr: Expected a <class "
                                                    "'float'> (got nan)"),
        (["--model.hiden", "3"], "Option 'hiden' is not accepted; did you mean 'hidden'?"),
        (["--data.batch_size", "many"], "data.batch_size: Expected a <class 'int'>"),
    ],
    ids=["hidden-0", "hidden-negative", "batch-size", "val-size", "steps-per-batch", "lr",
         "lr-0", "lr-nan", "misspelt-key", "wrong-type"],
)
def test_bad_values_end_with_one_line_naming_the_option(args, first_line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("train.py fit: error: ") and first_line in \
        err.splitlines()[0], err[:2000]
    assert "Traceback" not in err and "usage:" not in err


def test_default_root_dir_moves_every_artefact_from_any_working_directory(tmp_path):
    data = make_mnist_dir(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_train("fit", *tiny(data), "--trainer.max_epochs", "1",
                     "--trainer.default_root_dir", str(tmp_path / "out"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "out" / "mnist_regression"
    for artefact in ("version_0/metrics.csv", "version_0/loss_curve.png",
                     "version_0/config.yaml", "version_0/hparams.yaml", "checkpoints/last.ckpt"):
        assert (run / artefact).is_file(), artefact
    assert str(run / "version_0" / "loss_curve.png") in done.stdout
    assert list(elsewhere.iterdir()) == []  # nothing where it ran
    # and from there, relative to that working directory, the resume finds it
    done = run_train("validate", *tiny(data), "--trainer.default_root_dir", "../out",
                     "--ckpt_path", "last", cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []


def test_a_val_size_the_data_cannot_hold_is_one_line(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data")  # 96 training images
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(data), "--data.val_size", "96"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert error_line(err) == ("train.py: error: data.val_size=96 leaves no training images "
                               "out of 96; choose a smaller --data.val_size")
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "mnist_regression" / "checkpoints").exists()
