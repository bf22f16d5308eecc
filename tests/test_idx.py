"""IDX files are checked before they are trusted; each error names the file and the fault."""

import gzip

import pytest
import torch
from conftest import write_idx

from manual_grad.training.idx import IDXError, read_idx, read_idx_pair


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trips(tmp_path, gz):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(path, images, gz)
    assert torch.equal(read_idx(path, 3), images)


def test_truncated_file_names_file_and_sizes(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, torch.zeros(4, 28, 28))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IDXError, match=r"idx3-ubyte: truncated: header says 4 x 28 x 28"):
        read_idx(path, 3)


def test_trailing_bytes_are_refused(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, torch.zeros(4))
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(IDXError, match="labels: has trailing bytes"):
        read_idx(path, 1)


def test_wrong_magic_number_says_what_was_expected(tmp_path):
    path = tmp_path / "images"
    write_idx(path, torch.zeros(3))  # a label file where an image file belongs
    with pytest.raises(IDXError, match=r"images: bad magic number 0x00000801; expected 0x00000803"):
        read_idx(path, 3)


def test_short_and_corrupt_gzip_files(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(IDXError, match="shorter than an IDX header"):
        read_idx(short, 1)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(IDXError, match=r"broken.gz: cannot be read"):
        read_idx(broken, 1)


def test_pair_checks_counts_image_size_and_labels(tmp_path):
    write_idx(tmp_path / "img", torch.zeros(5, 28, 28))
    write_idx(tmp_path / "lab", torch.zeros(4))
    with pytest.raises(IDXError, match="holds 5 images but .*lab holds 4 labels"):
        read_idx_pair(tmp_path / "img", tmp_path / "lab")
    write_idx(tmp_path / "small", torch.zeros(4, 8, 8))
    with pytest.raises(IDXError, match="images are 8 x 8, expected 28 x 28"):
        read_idx_pair(tmp_path / "small", tmp_path / "lab")
    write_idx(tmp_path / "img4", torch.zeros(4, 28, 28))
    write_idx(tmp_path / "bad", torch.tensor([1, 2, 3, 12]))
    with pytest.raises(IDXError, match="label 12 is not a digit"):
        read_idx_pair(tmp_path / "img4", tmp_path / "bad")
