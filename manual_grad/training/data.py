"""MNIST (or Fashion-MNIST, or scikit-learn's 8x8 digits) as a LightningDataModule.

Inputs are flattened, scaled to [0, 1] and standardised with the training split's
mean and std (one number each, as in the seed); targets are the digit's value as a
float (the seed's regression). The last ``val_size`` training images are held out
for validation, as the seed holds out 10,000 of MNIST's 60,000.
"""

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from manual_grad import _compat
from manual_grad.training.callbacks import RunError
from manual_grad.training.idx import IDXError, read_idx_pair

SPLIT_FILES = {"train": "train", "test": "t10k"}
TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` that are empty, innermost first: a failed download
    leaves no empty tree behind. A folder with anything in it (a partial file, or a
    user's) stays: rmdir refuses it."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


class BatchGroup:
    """Consecutive (x, y) batches for one Lightning step, each cut from the resident tensors
    only when the training step reaches it: cutting the whole group at once would hold
    all its copies in memory together (at batch 4096 and 32 steps, 400 MB)."""

    def __init__(self, x: Tensor, y: Tensor, indices: Sequence[Tensor]) -> None:
        self.x, self.y, self.indices = x, y, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in self.indices:
            yield self.x[idx], self.y[idx]


class ResidentLoader:
    """Batches cut by index from tensors that already sit on the training device.

    No per-sample collate, no worker processes: one ``randperm`` per epoch and one
    gather per batch. Under DDP every rank draws the same permutation and takes
    every ``world_size``-th sample, so the ranks' batches together are exactly the
    batch a single process would see with ``batch_size * world_size``. For training
    the shares are equal (the last ``len % world_size`` samples of the permutation
    wait for the next epoch's), so every rank takes the same number of optimiser
    steps; for evaluation (``shuffle=False``) every sample is on exactly one rank and
    the shares differ by at most one, so a metric summed over the ranks covers the
    whole split, neither dropping a sample nor counting one twice.

    It is resumable: its state is the epoch and the number of batches the trainer
    completed, so a run restored from a mid-epoch checkpoint continues with the
    very batches it had not yet trained on.

    With ``group`` > 1 each item is a BatchGroup of up to ``group`` consecutive (x, y)
    batches, which the model trains on one optimiser step each: Lightning's per-step
    work is then paid once per group.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 progress: Callable[[], tuple[int, int]] | None = None, group: int = 1) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.progress = progress  # () -> (epoch, batches completed in it), from the trainer
        self.epoch, self.skip = 0, 0

    def _used(self) -> int:
        """How many samples of the split this epoch hands out over all the ranks."""
        n, world = len(self.x), self.world_size
        if self.shuffle:  # training: equal shares keep DDP's gradient syncs in step
            return n - n % world
        # evaluation: all of them, unless some rank would get none (n < world): a rank
        # with no batches logs nothing, and the others would wait for it to sync forever
        return n if n >= world else 0

    def _indices(self) -> Tensor:
        n = self._used()
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(self.x), generator=gen)[:n]
        else:
            perm = torch.arange(n)
        return perm[self.rank :: self.world_size].to(self.x.device)

    def __len__(self) -> int:
        share = len(range(self.rank, self._used(), self.world_size))  # this rank's samples
        return math.ceil(math.ceil(share / self.batch_size) / self.group)

    def __iter__(self) -> Iterator[Any]:
        if self.progress is not None:
            epoch, _ = self.progress()
            if epoch != self.epoch:
                self.epoch, self.skip = epoch, 0
        indices = self._indices()
        batches = indices.split(self.batch_size) if len(indices) else ()  # (not one empty)
        start, self.skip = self.skip, 0
        if self.group == 1:
            for idx in batches[start:]:
                yield self.x[idx], self.y[idx]
            return
        for first in range(start * self.group, len(batches), self.group):
            yield BatchGroup(self.x, self.y, batches[first : first + self.group])

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress() if self.progress is not None else (self.epoch, 0)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.skip = state["epoch"], state["batches_done"]


class MNISTDataModule(L.LightningDataModule):
    """MNIST regression data: 784 standardised pixels -> the digit's value.

    Args:
        dataset: ``mnist``, ``fashion_mnist`` or ``digits`` (scikit-learn's 8x8
            digits, bundled, no network).
        data_dir: where torchvision's layout lives (``<data_dir>/MNIST/raw``); files
            may be ``.gz`` or uncompressed. Missing files are downloaded there.
        batch_size: training batch size per process.
        val_size: images held out of the training set for validation (the last ones).
        fallback: what to train on when the dataset is neither present nor
            downloadable: ``digits`` (with a warning) or ``None`` (an error).
        download: try to download missing files.
        resident: keep each split as one tensor on the training device and batch
            by index (fast); ``False`` uses a DataLoader over a TensorDataset.
        steps_per_batch: optimiser steps per Lightning training step (needs
            ``resident``); train.py passes it to the model. 1 is Lightning's usual loop;
            more pays Lightning's per-step work once for that many steps.
        seed: seed of the per-epoch shuffle.
    """

    def __init__(
        self,
        dataset: Literal["mnist", "fashion_mnist", "digits"] = "mnist",
        data_dir: str = "data",
        batch_size: int = 64,
        val_size: int = 10000,
        fallback: Literal["digits"] | None = "digits",
        download: bool = True,
        resident: bool = True,
        seed: int = 0,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_size < 1:
            raise ValueError(f"data.val_size must be >= 1, got {val_size}")
        if steps_per_batch < 1 or (steps_per_batch > 1 and not resident):
            raise ValueError(f"data.steps_per_batch must be >= 1 and needs data.resident: "
                             f"true when > 1, got {steps_per_batch} (resident={resident})")
        self.save_hyperparameters()
        self.source = self._resolve_source(dataset, Path(data_dir), fallback, download)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def in_features(self) -> int:
        """Pixels per image of the data actually used: 784, or 64 for the 8x8 digits."""
        return 64 if self.source == "digits" else 784

    def _raw_dir(self, dataset: str, data_dir: Path) -> Path:
        return data_dir / TORCHVISION_CLASS[dataset] / "raw"

    def _find(self, raw: Path, split: str, kind: str) -> Path | None:
        stem = f"{SPLIT_FILES[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        for name in (stem, stem + ".gz"):
            if (raw / name).is_file():
                return raw / name
        return None

    def _present(self, dataset: str, data_dir: Path) -> bool:
        raw = self._raw_dir(dataset, data_dir)
        return all(self._find(raw, "train", kind) for kind in ("images", "labels"))

    def _resolve_source(self, dataset: str, data_dir: Path, fallback: str | None,
                        download: bool) -> str:
        if dataset == "digits" or self._present(dataset, data_dir):
            return dataset
        reason = "download=False"
        raw = self._raw_dir(dataset, data_dir)
        if download:
            import torchvision

            # the folders torchvision makes before it downloads (data_dir/MNIST/raw)
            made = [p for p in (data_dir, raw.parent, raw) if not p.exists()]
            try:
                getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])(
                    str(data_dir), train=True, download=True)
                getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])(
                    str(data_dir), train=False, download=True)
                return dataset
            except Exception as err:  # no network, proxy, disk: all mean "not here"
                reason = f"download failed: {str(err).strip().splitlines()[-1]}"
                _remove_empty(made)
        how = (f"put train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz) and the "
               f"t10k-* files in {raw}, or run once with network access")
        if fallback is None:
            raise FileNotFoundError(f"{dataset} is not in {raw} and {reason}. To fix: {how}.")
        warnings.warn(
            f"\n{'!' * 78}\n{dataset} is not in {raw} ({reason}).\nTraining on scikit-learn's "
            f"bundled 8x8 digits instead (1,797 images, 64 pixels).\nFor real {dataset}: {how}; "
            f"set data.fallback: null to make this an error.\n{'!' * 78}",
            UserWarning, stacklevel=2)
        return fallback

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        if self.source == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
            y = torch.tensor(digits.target)
            n_test = len(x) // 5  # the last fifth is the test split
            return (x[:-n_test], y[:-n_test]) if split == "train" else (x[-n_test:], y[-n_test:])
        raw = self._raw_dir(self.source, Path(self.hparams.data_dir))
        paths = [self._find(raw, split, kind) for kind in ("images", "labels")]
        if None in paths:
            raise FileNotFoundError(
                f"{raw} has no {SPLIT_FILES[split]}-images/labels IDX files for the {split} split")
        x, y = read_idx_pair(*paths)
        return x.float() / 255.0, y

    def setup(self, stage: str) -> None:
        if "train" not in self.splits:
            self._setup_train_val()
        if stage in ("test", "predict") and "test" not in self.splits:
            try:
                self.splits["test"] = self._prepare(*self._load("test"))
            except (FileNotFoundError, IDXError) as err:
                raise FileNotFoundError(f"the test split is needed for '{stage}': {err}") from err

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (x.flatten(1) - self.mean) / self.std, y.float()

    def _setup_train_val(self) -> None:
        x, y = self._load("train")
        val_size = self.hparams.val_size
        if val_size >= len(x):
            if self.source != "digits":
                raise RunError(f"data.val_size={val_size} leaves no training images out "
                               f"of {len(x)}; choose a smaller --data.val_size")
            shrunk = len(x) // 5  # the 8x8 digits are too few for MNIST's 10,000
            warnings.warn(f"data.val_size={val_size} is more than the {len(x)} training images "
                          f"of the 8x8 digits hold: validating on their last {shrunk} "
                          "instead (set data.val_size below that to choose)",
                          UserWarning, stacklevel=2)
            val_size = shrunk
        train = x[:-val_size].flatten(1)
        # one mean and one std over every training pixel, as in the seed
        self.mean, self.std = train.mean().item(), train.std().item()
        self.splits["train"] = self._prepare(x[:-val_size], y[:-val_size])
        self.splits["val"] = self._prepare(x[-val_size:], y[-val_size:])

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: which data the run trained on (train.py refuses to
        resume it on other data)."""
        return {"source": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("source")
        if saved is not None and saved != self.source:
            raise ValueError(f"this checkpoint was trained on {saved} data, not {self.source}")

    def _loader(self, split: str, shuffle: bool, group: int = 1) -> Any:
        x, y = self.splits[split]
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.hparams.resident and self._fits(x, device):
            progress = None
            if shuffle and trainer is not None:
                def progress() -> tuple[int, int]:
                    return trainer.current_epoch, _compat.batches_done(trainer) or 0
            return ResidentLoader(x.to(device), y.to(device), self.hparams.batch_size, shuffle,
                                  self.hparams.seed, rank, world, progress, group)
        if group > 1:
            raise ValueError("data.steps_per_batch > 1 needs the data resident on the device, "
                             "and it does not fit there; set data.steps_per_batch: 1")
        dataset, sampler = TensorDataset(x, y), None
        if not shuffle and world > 1 and len(x) >= world:
            # evaluation under DDP: every sample on exactly one rank, as in ResidentLoader.
            # Lightning keeps a DistributedSampler it is given; the one it would put in
            # by default pads the shares with repeated samples.
            sampler = _compat.unrepeated_sampler(dataset, num_replicas=world, rank=rank)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          sampler=sampler, pin_memory=device.type == "cuda")

    @staticmethod
    def _fits(x: Tensor, device: torch.device) -> bool:
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return x.numel() * x.element_size() < free // 4

    def train_dataloader(self) -> Any:
        return self._loader("train", shuffle=True, group=self.hparams.steps_per_batch)

    def val_dataloader(self) -> Any:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", shuffle=False)
