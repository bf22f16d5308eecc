"""Training the seed's network with Lightning: manual and native agree, runs resume exactly,
the real digits are learned, and DDP equals one process over the same global batch."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_grouped, make_mnist_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import manual_grad
from manual_grad.training import MNISTDataModule, MNISTRegressor, ResidentLoader
from manual_grad.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_regression.yaml"
T10K = Path(os.environ.get("MNIST_T10K_DIR", ROOT.parent / "shared" / "data" / "mnist-t10k"))


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    # main(args) runs as if from the command line; pytest's own argv is not for it
    monkeypatch.setattr(sys, "argv", ["train.py"])


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def fit(data_dir, impl="manual", epochs=3, callbacks=(), ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=16, val_size=16, download=False)
    model = MNISTRegressor(in_features=dm.in_features, hidden=12, impl=impl)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("impl", ["manual", "fused"])
def test_manual_and_native_give_the_same_loss_curve(tiny_mnist, impl):
    curves, weights = [], []
    for run_impl in (impl, "native"):
        rec = StepLosses()
        _, model = fit(tiny_mnist, impl=run_impl, callbacks=[rec], precision=64,
                       enable_checkpointing=False)
        curves.append(torch.tensor(rec.losses, dtype=torch.float64))
        weights.append(model.state_dict())
    assert len(curves[0]) == 15  # 3 epochs x 5 batches of 16 out of 80 training images
    assert curves[0][-1] < curves[0][0]  # it learns
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-9)


def test_crashed_run_resumes_at_the_right_step_with_nothing_lost(tiny_mnist, tmp_path):
    _, reference = fit(tiny_mnist, epochs=3, enable_checkpointing=False)

    def checkpoint():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_exception=True)

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_mnist, epochs=3, callbacks=[checkpoint(), Crash(at_step=7)])  # mid epoch 2
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 7
    resumed_trainer, resumed = fit(tiny_mnist, epochs=3, callbacks=[checkpoint()],
                                   ckpt_path="last")
    assert resumed_trainer.global_step == 15
    torch.testing.assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)


def run_train(*args, cwd, timeout=300):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_fit_validate_test_write_what_the_readme_says(tiny_mnist, tmp_path):
    common = ["--config", str(CONFIG), "--data.data_dir", str(tiny_mnist), "--data.val_size",
              "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]
    done = run_train("fit", *common, "--trainer.max_epochs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "manual_grad: finished 2 epochs: val_mse=" in done.stdout
    run = tmp_path / "runs" / "mnist_regression"
    header = (run / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_mse", "val_mse", "val_acc", "epoch"} <= set(header)
    assert (run / "version_0" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "version_0" / "config.yaml").is_file()
    ckpts = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("epoch=") for n in ckpts)
    for sub, metric in (("validate", "val_mse"), ("test", "test_mse")):
        done = run_train(sub, *common, "--ckpt_path", "last", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert metric in done.stdout


def test_cli_resume_with_ckpt_path_last_continues_the_previous_run(tiny_mnist, tmp_path, capsys):
    common = ["--config", str(CONFIG), "--data.data_dir", str(tiny_mnist), "--data.val_size",
              "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]
    os.chdir(tmp_path)
    try:
        first = main(["fit", *common, "--trainer.max_epochs", "1"])
        second = main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    finally:
        os.chdir(ROOT)
    assert first.trainer.global_step == 5
    # a new logger version folder, yet the checkpoint of version_0 was found
    assert second.trainer.logger.version == 1
    assert second.trainer.global_step == 10


def test_a_new_run_and_its_resume_leave_the_old_runs_last_ckpt_alone(tiny_mnist, tmp_path):
    common = ["--config", str(CONFIG), "--data.data_dir", str(tiny_mnist), "--data.val_size",
              "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"]
    ckpts = tmp_path / "runs" / "mnist_regression" / "checkpoints"
    os.chdir(tmp_path)
    try:
        main(["fit", *common, "--trainer.max_epochs", "1"])  # run A: last.ckpt
        old = (ckpts / "last.ckpt").read_bytes()
        main(["fit", *common, "--trainer.max_epochs", "1", "--seed_everything", "1"])  # run B
        assert (ckpts / "last-v1.ckpt").is_file() and (ckpts / "last.ckpt").read_bytes() == old
        os.utime(ckpts / "last-v1.ckpt")  # B's is the newest, whatever the clock's resolution
        resumed = main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    finally:
        os.chdir(ROOT)
    assert resumed.trainer.global_step == 10  # B continued: "last" is the newest last*.ckpt
    assert torch.load(ckpts / "last-v1.ckpt", weights_only=True)["global_step"] == 10
    assert (ckpts / "last.ckpt").read_bytes() == old  # A's file, byte for byte


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.hiden", "3"], "hiden"),
        (["--data.batch_size", "many"], "batch_size"),
        (["--model.impl", "jax"], "impl"),
        (["--config", "no_such.yaml"], "no_such.yaml"),
    ],
    ids=["unknown-key", "wrong-type", "bad-choice", "missing-file"],
)
def test_cli_config_mistakes_end_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), *args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_run_without_validation_says_so_instead_of_printing_nan(tiny_mnist, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(CONFIG), "--data.data_dir", str(tiny_mnist), "--data.val_size",
              "16", "--data.batch_size", "16", "--trainer.enable_progress_bar", "false",
              "--trainer.max_epochs", "1"]
    main(["fit", *common, "--trainer.limit_val_batches", "0"])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("manual_grad: finished 1 epoch: no validation ran (")
    assert "nan" not in line
    main(["fit", *common])  # with validation: both metrics, as numbers
    line = capsys.readouterr().out.splitlines()[-1]
    assert "val_mse=" in line and "val_acc=" in line and "nan" not in line


def test_cli_print_config_shows_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for key in ("impl: manual", "dataset: mnist", "val_size: 10000", "fallback: digits",
                "class_path: torch.optim.SGD"):
        assert key in out


def test_offline_digits_config_runs_end_to_end(tmp_path):
    done = run_train("fit", "--config", str(ROOT / "configs" / "digits_regression.yaml"),
                     "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "manual_grad: finished 2 epochs" in done.stdout


def test_ddp_on_two_cpu_processes_equals_one_process_on_the_global_batch(tmp_path):
    data = make_mnist_dir(tmp_path / "data", n_train=95)  # 80 to train, 15 to validate
    common = ["--config", str(CONFIG), "--data.data_dir", str(data), "--data.val_size",
              "15", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
              "--trainer.precision", "64", "--trainer.max_steps", "5"]  # one epoch
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]

    def val_metrics(run_dir: Path, version: int) -> dict[str, float]:
        with (run_dir / f"version_{version}" / "metrics.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_mse")]
        return {k: float(rows[-1][k]) for k in ("val_mse", "val_acc")}

    states, metrics = [], []
    for name, extra in (("single", ["--data.batch_size", "16"]),
                        ("ddp", ["--data.batch_size", "8", *ddp])):
        (tmp_path / name).mkdir()
        done = run_train("fit", *common, *extra, cwd=tmp_path / name, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        run = tmp_path / name / "runs" / "mnist_regression"
        states.append(torch.load(run / "checkpoints" / "last.ckpt",
                                 weights_only=False)["state_dict"])
        metrics.append(val_metrics(run, 0))
    torch.testing.assert_close(states[1], states[0], rtol=1e-10, atol=1e-12)
    # the processes validate 8 and 7 of the 15 images; the logged means are over all 15
    # (not over 14, as an even split would drop one, nor 16 with one counted twice)
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-10)
    # the same through a DataLoader (data.resident false), where Lightning's default
    # DistributedSampler would have padded rank 1's share with a repeated image
    validated = []
    for name, extra in (("single", []), ("ddp", ddp)):
        done = run_train("validate", *common, "--data.batch_size", "8", "--data.resident",
                         "false", "--ckpt_path", "last", *extra, cwd=tmp_path / name,
                         timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        validated.append(val_metrics(tmp_path / name / "runs" / "mnist_regression", 1))
    assert validated[1] == pytest.approx(validated[0], rel=1e-10)  # (the states agree to 1e-10)
    assert validated[1]["val_acc"] == pytest.approx(metrics[0]["val_acc"], rel=1e-12)


@pytest.mark.skipif(not T10K.is_dir(), reason=f"real MNIST test set not found in {T10K}")
def test_real_mnist_digits_are_learned(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):  # the 10,000 test digits serve as train.py's
        shutil.copy(T10K / f"t10k-{kind}-ubyte.gz", raw / f"train-{kind}-ubyte.gz")
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=2000, download=False, fallback=None)
    model = MNISTRegressor(in_features=dm.in_features)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, dm)
    assert len(dm.splits["train"][0]) == 8000 and len(dm.splits["val"][0]) == 2000
    assert trainer.callback_metrics["val_mse"] < 2.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_keeps_the_data_resident_and_matches_native(tiny_mnist):
    losses = []
    for impl in ("manual", "native"):
        rec = StepLosses()
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=16, val_size=16,
                             download=False)
        model = MNISTRegressor(in_features=784, hidden=12, impl=impl)
        trainer = L.Trainer(max_epochs=2, accelerator="gpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_checkpointing=False,
                            callbacks=[rec], precision=64)
        trainer.fit(model, dm)
        loader = trainer.train_dataloader
        assert isinstance(loader, ResidentLoader) and loader.x.device.type == "cuda"
        losses.append(torch.tensor(rec.losses))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_several_steps_per_lightning_step_take_the_same_steps(tiny_mnist, tmp_path):
    """data.steps_per_batch groups batches; each still gets its own optimiser step, and
    every step's loss is still recorded, at its own step number."""
    results = []
    for k in (1, 3):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=16, val_size=16,
                             download=False, steps_per_batch=k)
        model = MNISTRegressor(in_features=784, hidden=12, steps_per_batch=k)
        rec = StepLosses()
        logger = CSVLogger(tmp_path, name=f"k{k}")
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", precision=64, logger=logger,
                            enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[rec] if k == 1 else [])
        trainer.fit(model, dm)
        results.append((trainer.global_step, model.state_dict(),
                        float(trainer.callback_metrics["train_mse"]), rec.losses))
    (steps1, weights1, mse1, losses1), (steps3, weights3, mse3, _) = results
    assert steps1 == steps3 == 15  # 5 optimiser steps per epoch either way (2 groups of 3)
    torch.testing.assert_close(weights3, weights1, rtol=1e-12, atol=1e-12)
    assert mse3 == pytest.approx(mse1, rel=1e-12)
    with (tmp_path / "k3" / "version_0" / "metrics.csv").open() as f:
        logged = {int(r["step"]): float(r["train_mse_step"]) for r in csv.DictReader(f)
                  if r.get("train_mse_step")}
    assert sorted(logged) == list(range(15))
    assert [logged[i] for i in range(15)] == pytest.approx(losses1, rel=1e-12)


class StepLossesAndSizes(StepLosses):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.sizes.append(len(batch[1]))


@pytest.mark.parametrize("impl", ["manual", "native"])
def test_epoch_metrics_are_means_over_every_sample(tiny_mnist, impl):
    """train/val/test metrics are logged once per epoch from running sums: each must be
    the mean over the epoch's samples, with a short last batch weighing its size (80
    training images in batches of 7, 16 validation images in batches of 7)."""
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=7, val_size=16, download=False)
    model = MNISTRegressor(in_features=784, hidden=12, impl=impl)
    rec = StepLossesAndSizes()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", precision=64, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(model, dm)
    steps = len(rec.sizes) // 2  # the last epoch's steps
    losses = torch.tensor(rec.losses[steps:], dtype=torch.float64)
    sizes = torch.tensor(rec.sizes[steps:])
    assert sizes.tolist() == [7] * 11 + [3]
    train_mse = float(trainer.callback_metrics["train_mse"])
    assert train_mse == pytest.approx(float((losses * sizes).sum() / sizes.sum()), rel=1e-12)

    def expected(split):  # the torch.nn oracle over the whole split at once
        x, y = dm.splits[split]
        with torch.no_grad():
            out = model.double()(x.double())
        return (torch.nn.functional.mse_loss(out, y.double()).item(),
                (out.round() == y).double().mean().item())

    metrics = trainer.validate(model, dm, verbose=False)[0]
    val_mse, val_acc = expected("val")
    assert metrics["val_mse"] == pytest.approx(val_mse, rel=1e-12)
    assert metrics["val_acc"] == pytest.approx(val_acc, rel=1e-12)
    metrics = trainer.test(model, dm, verbose=False)[0]
    test_mse, test_acc = expected("test")
    assert metrics["test_mse"] == pytest.approx(test_mse, rel=1e-12)
    assert metrics["test_acc"] == pytest.approx(test_acc, rel=1e-12)


@pytest.mark.parametrize("k", [1, 4])
def test_bfloat16_losses_are_averaged_in_float32(tiny_mnist, k):
    """80 one-image steps of losses ~10-50: a bfloat16 running sum would round each
    addition to a multiple of 2-8 once past a few hundred."""
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=1, val_size=16, download=False,
                         steps_per_batch=k)
    model = MNISTRegressor(in_features=784, hidden=12, steps_per_batch=k,  # losses stay
                           optimizer=lambda params: torch.optim.SGD(params, lr=1e-4))  # finite
    logger = CSVLogger(tiny_mnist, name=f"bf16-k{k}") if k > 1 else False
    rec = StepLosses()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-true",
                        logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[rec] if k == 1 else [])
    trainer.fit(model, dm)
    if k > 1:  # the grouped steps' losses, as logged
        trainer.logger.save()
        with (Path(trainer.logger.log_dir) / "metrics.csv").open() as f:
            rec.losses = [float(r["train_mse_step"]) for r in csv.DictReader(f)
                          if r.get("train_mse_step")]
    assert len(rec.losses) == 80
    expected = sum(rec.losses) / 80  # the bfloat16 losses, averaged in float64
    assert float(trainer.callback_metrics["train_mse"]) == pytest.approx(expected, rel=1e-6)


def test_an_interrupted_validation_leaves_nothing_to_the_next(tiny_mnist):
    class StopOnce(L.Callback):
        stopped = False

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                    dataloader_idx=0):
            if not self.stopped:
                self.stopped = True
                raise RuntimeError("interrupted")

    dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=7, val_size=16, download=False)
    model = MNISTRegressor(in_features=784, hidden=12)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StopOnce()])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.validate(model, dm, verbose=False)  # one batch summed, then stopped
    metrics = trainer.validate(model, dm, verbose=False)[0]
    x, y = dm.splits["val"]
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(x), y).item()
    assert metrics["val_mse"] == pytest.approx(expected, rel=1e-5)


def test_fused_grouped_steps_read_the_rows_from_the_split(tiny_mnist, monkeypatch):
    """impl fused with data.steps_per_batch: each step's loss reads its batch's rows from
    the resident split (FusedMLP.mse_loss(X, Y, rows=idx)), no gathered copy, and takes
    the steps the gathered batches take."""
    calls = []
    mse_loss = manual_grad.FusedMLP.mse_loss

    def spy(self, input, target, reduction="mean", rows=None):
        calls.append(rows is not None)
        return mse_loss(self, input, target, reduction, rows)

    monkeypatch.setattr(manual_grad.FusedMLP, "mse_loss", spy)
    results = []
    for reads_rows in (True, False):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=7, val_size=16,
                             download=False, steps_per_batch=4)
        model = MNISTRegressor(in_features=784, hidden=12, impl="fused", steps_per_batch=4)
        model.reads_rows = reads_rows
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, limit_val_batches=0)
        calls.clear()
        trainer.fit(model, dm)
        results.append((model.state_dict(), float(trainer.callback_metrics["train_mse"])))
        assert trainer.global_step == 24 and calls == [reads_rows] * 24  # 12 steps an epoch
    (rows_state, rows_mse), (gathered_state, gathered_mse) = results
    torch.testing.assert_close(rows_state, gathered_state, rtol=1e-5, atol=1e-6)
    assert rows_mse == pytest.approx(gathered_mse, rel=1e-5)


def test_steps_per_batch_needs_resident_data(tiny_mnist):
    with pytest.raises(ValueError, match="data.steps_per_batch must be >= 1 and needs "
                                         "data.resident"):
        MNISTDataModule(data_dir=str(tiny_mnist), resident=False, steps_per_batch=4,
                        download=False)


def test_grouped_steps_resume_exactly_after_a_crash(tiny_mnist, tmp_path):
    def run(callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=16, val_size=16,
                             download=False, steps_per_batch=3)
        model = MNISTRegressor(in_features=784, hidden=12, steps_per_batch=3)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            default_root_dir=tmp_path)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer, model

    _, reference = run([])

    def checkpoint():
        return ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_exception=True)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([checkpoint(), Crash(at_step=8)])  # epoch 2, before its second group
    resumed_trainer, resumed = run([checkpoint()], ckpt_path="last")
    assert resumed_trainer.global_step == 15
    torch.testing.assert_close(resumed.state_dict(), reference.state_dict(), rtol=0, atol=0)


class CountsBackwardHooks(L.Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.calls += 1


def test_grouped_steps_skip_lightnings_step_wrappers_only_when_nothing_listens(tiny_mnist):
    """The plain inner step (loss.backward(), optimizer.step()) is taken only when no
    callback needs Lightning's per-step hooks; then and otherwise the steps are the same."""
    runs = {}
    for listening in (False, True):
        hook = CountsBackwardHooks()
        trainer, model, choices = fit_grouped(tiny_mnist, 3, [hook] if listening else [],
                                              max_epochs=3, precision=64, logger=False)
        runs[listening] = (set(choices), hook.calls, trainer.global_step, model.state_dict())
    assert runs[False][0] == {True} and runs[True][0] == {False}
    assert runs[True][1] == 15  # the listening callback saw every optimiser step
    assert runs[False][2] == runs[True][2] == 15
    torch.testing.assert_close(runs[False][3], runs[True][3], rtol=1e-12, atol=1e-12)
