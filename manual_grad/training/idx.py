"""Reading MNIST-style IDX files, with every file checked before it is trusted.

torchvision parses IDX with bare asserts and reads no ``.gz``; a truncated
download then fails far from its cause. Here each file's header (magic number,
element type, rank, sizes) and length are checked first, and any mismatch raises
an :class:`IDXError` that names the file and what is wrong.
"""

import gzip
import math
from pathlib import Path

import torch

UINT8 = 0x08  # the IDX type code MNIST uses for both images and labels


class IDXError(ValueError):
    """An IDX file that is missing, truncated or not what it claims to be."""


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Read a uint8 IDX file (optionally gzipped) of rank ``ndim`` into a tensor."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise IDXError(f"{path}: cannot be read ({err}); delete it and fetch it again") from err
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes is shorter than an IDX magic number")
    zero, dtype, rank = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != UINT8 or rank != ndim:
        raise IDXError(
            f"{path}: bad magic number 0x{data[0:4].hex()}; expected 0x0000080{ndim} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: {len(data)} bytes is shorter than an IDX header ({header} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: header says {' x '.join(map(str, dims))} "
            f"({expected} bytes in all) but the file holds {len(data)} bytes"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*dims)


def read_idx_pair(images: Path, labels: Path, image_size: tuple[int, int] = (28, 28)):
    """Images (N, H, W) and labels (N,), checked against each other."""
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if tuple(x.shape[1:]) != image_size:
        raise IDXError(
            f"{images}: images are {x.shape[1]} x {x.shape[2]}, expected "
            f"{image_size[0]} x {image_size[1]}"
        )
    if len(x) != len(y):
        raise IDXError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(y) and int(y.max()) > 9:
        raise IDXError(f"{labels}: label {int(y.max())} is not a digit class 0-9")
    return x, y
