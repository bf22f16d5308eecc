"""MNISTDataModule: loading, standardising, splitting, falling back, and batching by index."""

from pathlib import Path

import pytest
import torch
import torchvision

from manual_grad.training import MNISTDataModule, ResidentLoader, RunError
from manual_grad.training.idx import IDXError


def test_tiny_mnist_is_loaded_standardised_and_split(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist), val_size=16, download=False)
    assert dm.source == "mnist" and dm.in_features == 784
    dm.setup("fit")
    x, y = dm.splits["train"]
    xv, yv = dm.splits["val"]
    assert x.shape == (80, 784) and xv.shape == (16, 784)
    assert y.dtype == torch.float32 and set(y.tolist()) <= set(range(10))
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4  # train statistics
    # the held-out images are the *last* val_size ones, standardised with train's statistics
    from manual_grad.training.idx import read_idx

    raw = read_idx(tiny_mnist / "MNIST/raw/train-images-idx3-ubyte.gz", 3)
    expected = (raw[-16:].flatten(1).float() / 255 - dm.mean) / dm.std
    torch.testing.assert_close(xv, expected)
    dm.setup("test")  # uncompressed t10k files are read for the test split
    assert dm.splits["test"][0].shape == (32, 784)


def test_corrupt_file_is_reported_by_name(tiny_mnist):
    path = tiny_mnist / "MNIST/raw/train-labels-idx1-ubyte.gz"
    import gzip

    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    dm = MNISTDataModule(data_dir=str(tiny_mnist), val_size=16, download=False)
    with pytest.raises(IDXError, match="train-labels-idx1-ubyte.gz: truncated"):
        dm.setup("fit")


def test_val_size_that_leaves_nothing_to_train_on(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist), val_size=96, download=False)
    with pytest.raises(RunError, match="val_size=96 leaves no training images out of 96"):
        dm.setup("fit")


def test_missing_mnist_falls_back_to_digits_loudly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.warns(UserWarning, match=r"(?s)mnist is not in .*download failed: no network.*"
                                         r"8x8 digits.*data.fallback: null"):
        dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10000)
    assert dm.source == "digits" and dm.in_features == 64
    dm.setup("fit")
    assert dm.splits["train"][0].shape[1] == 64
    assert len(dm.splits["train"][0]) + len(dm.splits["val"][0]) == 1797 - 1797 // 5


def _offline_after_mkdir(root, train=True, download=False):
    """torchvision's MNIST without a network: it makes root/MNIST/raw, then fails."""
    (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline_after_mkdir)
    with pytest.warns(UserWarning, match="download failed: no network"):
        MNISTDataModule(data_dir=str(tmp_path / "data"))
    assert list(tmp_path.iterdir()) == []  # data/MNIST/raw, all made by the try, are gone


def test_failed_download_keeps_folders_that_hold_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline_after_mkdir)
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")  # the user's folder, there before
    with pytest.warns(UserWarning, match="download failed"):
        MNISTDataModule(data_dir=str(data))
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt"]
    assert (data / "notes.txt").read_text() == "mine"

    def partial_then_fail(root, train=True, download=False):  # a half-written download
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b")
        raise RuntimeError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "MNIST", partial_then_fail)
    with pytest.warns(UserWarning, match="download failed: connection reset"):
        MNISTDataModule(data_dir=str(data))
    assert (data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()  # not deleted


def test_strict_mode_makes_missing_data_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist is not in .*MNIST/raw and download=False"):
        MNISTDataModule(data_dir=str(tmp_path), fallback=None, download=False)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        MNISTDataModule(dataset="digits", batch_size=0)


def test_resident_loader_covers_every_sample_once_per_epoch():
    x = torch.arange(10.0).view(10, 1)
    loader = ResidentLoader(x, x.squeeze(1), batch_size=4, shuffle=True, seed=1)
    assert len(loader) == 3
    seen = torch.cat([xb.squeeze(1) for xb, _ in loader])
    assert sorted(seen.tolist()) == list(range(10))
    for xb, yb in loader:
        assert torch.equal(xb.squeeze(1), yb)  # inputs and targets stay paired
    loader.epoch = 1
    assert not torch.equal(torch.cat([xb for xb, _ in loader]).squeeze(1), seen)  # reshuffled


def test_resident_loader_shards_add_up_to_the_single_process_batches():
    x = torch.arange(24.0)
    single = ResidentLoader(x, x, batch_size=8, shuffle=True, seed=3)
    ranks = [ResidentLoader(x, x, batch_size=4, shuffle=True, seed=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for (xs, _), (x0, _), (x1, _) in zip(single, *ranks, strict=True):
        assert sorted(xs.tolist()) == sorted(torch.cat([x0, x1]).tolist())


@pytest.mark.parametrize(("n", "world"), [(10, 3), (9, 3), (17, 2), (5, 4)])
def test_resident_evaluation_shares_hold_every_sample_once(n, world):
    """Validation under DDP: the ranks' shares together are the whole split, each sample
    once (not n - n % world of them), and each rank's len() is the batches it yields."""
    x = torch.arange(float(n))
    ranks = [ResidentLoader(x, x, batch_size=2, shuffle=False, rank=r, world_size=world)
             for r in range(world)]
    shares = [[xb for xb, _ in loader] for loader in ranks]
    assert [len(loader) for loader in ranks] == [len(share) for share in shares]
    seen = sorted(torch.cat([xb for share in shares for xb in share]).tolist())
    assert seen == list(range(n))
    sizes = [sum(len(xb) for xb in share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_resident_evaluation_gives_no_rank_an_empty_share_alone():
    """Fewer samples than ranks: no rank validates (as with an empty split), rather than
    some ranks logging and waiting forever for the ones with nothing to log."""
    x = torch.arange(3.0)
    ranks = [ResidentLoader(x, x, batch_size=2, shuffle=False, rank=r, world_size=4)
             for r in range(4)]
    assert [len(loader) for loader in ranks] == [0] * 4
    assert all(list(loader) == [] for loader in ranks)


def test_resident_loader_resumes_after_the_batches_already_trained():
    x = torch.arange(20.0)
    full = [xb for xb, _ in ResidentLoader(x, x, batch_size=3, shuffle=True, seed=5)]
    resumed = ResidentLoader(x, x, batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict({"epoch": 0, "batches_done": 4})
    rest = [xb for xb, _ in resumed]
    assert len(rest) == len(full) - 4
    for a, b in zip(rest, full[4:], strict=True):
        assert torch.equal(a, b)
    assert len([xb for xb, _ in resumed]) == len(full)  # the next pass is a whole epoch
