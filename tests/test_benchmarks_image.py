"""The image task's data loaders (IDX and JPEG archives, with the decode cache) and a short run
of each model, on tiny fake datasets written in the test's folder (nothing from the network)."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
from benchmarks import datasets
from benchmarks.tasks import image

PIL = pytest.importorskip("PIL.Image")


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_fashion(root, per_class=3):
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (labels.size, 28, 28))
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def _fake_cifar(root, per_class=2):
    folder = root / "cifar10-jpeg"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with tarfile.open(folder / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            for label in datasets.CIFAR10_CLASSES:
                for i in range(per_class):
                    buffer = io.BytesIO()
                    pixels = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
                    PIL.fromarray(pixels).save(buffer, format="JPEG", quality=75)
                    info = tarfile.TarInfo(f"{split}/{label}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


def test_fashion_mnist_is_read_from_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    splits = datasets.fashion_mnist(tmp_path)
    assert splits["train"].images.shape == (30, 1, 28, 28)
    assert splits["train"].images.dtype == torch.uint8
    assert splits["test"].labels.bincount().tolist() == [3] * 10


def test_cifar10_is_decoded_once_and_then_read_from_the_cache(tmp_path):
    _fake_cifar(tmp_path)
    first = datasets.cifar10(tmp_path, tmp_path / "cache")
    assert first["train"].images.shape == (20, 3, 32, 32)
    assert len(list((tmp_path / "cache").glob("cifar10-jpeg-*.pt"))) == 1
    second = datasets.cifar10(tmp_path, tmp_path / "cache")
    assert torch.equal(first["test"].images, second["test"].images)
    assert torch.equal(first["test"].labels, second["test"].labels)


def test_missing_or_malformed_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 archive not found: .*cifar10-jpeg"):
        datasets.cifar10(tmp_path, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"dataset file not found: .*train-images"):
        datasets.fashion_mnist(tmp_path)
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"junk"))
    with pytest.raises(ValueError, match=r"not an IDX file"):
        datasets.fashion_mnist(tmp_path)


@pytest.mark.parametrize("variant", image.VARIANTS)
@pytest.mark.parametrize("method", ["lorsum-x1", "lora-adamw", "full-sgd"])
def test_every_model_trains_a_few_steps_and_is_evaluated(variant, method, tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    _fake_cifar(tmp_path)
    monkeypatch.setattr(image, "CACHE_DIR", tmp_path / "cache")
    result = image.train(variant, method, 0.01, 0, steps=2, data_dir=tmp_path)
    assert len(result["curves"]["train_loss"]) == 2
    assert 0.0 <= result["final"]["test_accuracy"] <= 1.0
    assert result["final"]["best_test_accuracy"] >= result["final"]["test_accuracy"]


def test_the_quick_budget_is_two_epochs_of_ten_thousand_images():
    assert image.default_steps("cifar10-lenet5", "quick") == 2 * 157
    assert image.default_steps("fashion-lenet5", "full") == 20 * 938
