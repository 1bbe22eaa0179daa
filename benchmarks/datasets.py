"""Real datasets for the benchmark tasks, read from a data directory (default ../shared/data).

Nothing is downloaded. Image sets come back as ``uint8`` tensors ``(N, C, H, W)`` plus ``int64``
labels; CIFAR-10 (JPEG) is decoded once with Pillow and cached as a ``.pt`` file, because
decoding 60,000 JPEGs takes longer than a quick run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A dataset file is malformed: the command line reports it in one line (exit status 2)."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset file the task reads is not in the data directory."""


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class ImageSplit:
    images: Tensor  # (N, C, H, W) uint8
    labels: Tensor  # (N,) int64


def fashion_mnist(data_dir: Path) -> dict[str, ImageSplit]:
    """Fashion-MNIST from ``<data_dir>/fashion-mnist/*-idx?-ubyte.gz``: 60,000 / 10,000 images."""
    folder = Path(data_dir) / "fashion-mnist"
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", expected_ndim=3)
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", expected_ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{folder}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        out[split] = ImageSplit(images.unsqueeze(1), labels.long())
    return out


def cifar10(data_dir: Path, cache_dir: Path) -> dict[str, ImageSplit]:
    """CIFAR-10 from ``<data_dir>/cifar10-jpeg/cifar10-jpeg.tar.gz`` (JPEG q75 re-encodings).

    Decoded once and cached in ``cache_dir`` under the archive's SHA-256 prefix, so a changed
    archive is never read from a stale cache. The cache is written atomically.
    """
    archive = Path(data_dir) / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        raise MissingDataError(
            f"CIFAR-10 archive not found: {archive} (expected the shared data layout, see "
            "../shared/data/README.md, or pass --data-dir)"
        )
    digest = _sha256_prefix(archive)
    cache = Path(cache_dir) / f"cifar10-jpeg-{digest}.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        return {split: ImageSplit(*stored[split]) for split in ("train", "test")}
    decoded = _decode_cifar_archive(archive)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # One temporary file per process: parallel runs may decode the archive at the same time.
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save({split: (s.images, s.labels) for split, s in decoded.items()}, tmp)
    os.replace(tmp, cache)
    return decoded


def _decode_cifar_archive(archive: Path) -> dict[str, ImageSplit]:
    from PIL import Image

    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            split, label, _ = parts
            if split not in images or label not in CIFAR10_CLASSES:
                raise DataError(f"{archive}: unexpected member {member.name!r}")
            data = tar.extractfile(member).read()
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
            if pixels.shape != (32, 32, 3):
                raise DataError(f"{archive}: {member.name} decodes to {pixels.shape}, not 32x32x3")
            images[split].append(pixels)
            labels[split].append(CIFAR10_CLASSES.index(label))
    out = {}
    for split in ("train", "test"):
        if not images[split]:
            raise DataError(f"{archive}: no {split}/<class>/*.jpg images")
        stacked = torch.from_numpy(np.stack(images[split])).permute(0, 3, 1, 2).contiguous()
        out[split] = ImageSplit(stacked, torch.tensor(labels[split], dtype=torch.int64))
    return out


def _read_idx(path: Path, *, expected_ndim: int) -> Tensor:
    """An IDX file (the MNIST format): big-endian magic ``0x0000 08 ndim``, dims, then uint8."""
    if not path.is_file():
        raise MissingDataError(f"dataset file not found: {path}")
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(f"{path}: not an IDX file of {expected_ndim} uint8 dimension(s)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim)]
    offset = 4 + 4 * expected_ndim
    count = int(np.prod(dims))
    if len(raw) != offset + count:
        raise DataError(f"{path}: header says {dims} but holds {len(raw) - offset} bytes")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy())


def _sha256_prefix(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
