"""Fashion-MNIST idx loading (plain and gzip), its error paths, and the bilinear rotation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from agent.data import (
    DataError,
    load_fashion_mnist,
    load_idx_images,
    load_idx_labels,
    rotate_images,
)


def idx_images_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">ii", magic, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def test_fashion_mnist_matches_readme(data_dir):
    train, test = load_fashion_mnist(data_dir)
    assert train.X.shape == (60000, 784) and test.X.shape == (10000, 784)
    assert train.X.dtype == np.float32 and train.y.dtype == np.int64
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert train.X.min() == 0.0 and train.X.max() == 1.0
    assert train.meta["class_names"][9] == "Ankle boot"


def test_plain_and_gzip_idx_give_the_same_arrays(tmp_path, images):
    (tmp_path / "img").write_bytes(idx_images_bytes(images))
    (tmp_path / "img.gz").write_bytes(gzip.compress(idx_images_bytes(images)))
    np.testing.assert_array_equal(load_idx_images(tmp_path / "img"), images)
    np.testing.assert_array_equal(load_idx_images(tmp_path / "img.gz"), images)
    labels = np.arange(5, dtype=np.uint8)
    (tmp_path / "lab.gz").write_bytes(gzip.compress(idx_labels_bytes(labels)))
    np.testing.assert_array_equal(load_idx_labels(tmp_path / "lab.gz"), labels)


def test_bad_magic(tmp_path, images):
    (tmp_path / "labels-as-images").write_bytes(idx_labels_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="magic number 2049 \\(that is an idx1 label file\\)"):
        load_idx_images(tmp_path / "labels-as-images")
    (tmp_path / "images-as-labels").write_bytes(idx_images_bytes(images))
    with pytest.raises(DataError, match=r"magic number 2051 .* expected 2049"):
        load_idx_labels(tmp_path / "images-as-labels")
    (tmp_path / "junk").write_bytes(b"\x00\x01\x02\x03" * 8)
    with pytest.raises(DataError, match=r"junk: magic number 66051, expected 2051"):
        load_idx_images(tmp_path / "junk")


def test_truncated_and_oversized_payload(tmp_path, images):
    content = idx_images_bytes(images)
    (tmp_path / "short").write_bytes(content[:-100])
    with pytest.raises(DataError, match=r"short: 3820 data bytes, .* 5 images of 28x28.*truncated"):
        load_idx_images(tmp_path / "short")
    (tmp_path / "long").write_bytes(content + b"\x00")
    with pytest.raises(DataError, match="extra bytes"):
        load_idx_images(tmp_path / "long")
    (tmp_path / "header").write_bytes(content[:10])
    with pytest.raises(DataError, match="shorter than the 16-byte idx3 images header"):
        load_idx_images(tmp_path / "header")
    (tmp_path / "labels").write_bytes(idx_labels_bytes(np.arange(10))[:-3])
    with pytest.raises(DataError, match="truncated"):
        load_idx_labels(tmp_path / "labels")


def test_truncated_and_corrupted_gzip(tmp_path, images):
    packed = gzip.compress(idx_images_bytes(images))
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: corrupted or truncated gzip"):
        load_idx_images(tmp_path / "cut.gz")
    broken = packed[:12] + bytes(b ^ 0x55 for b in packed[12:40]) + packed[40:]
    (tmp_path / "bad.gz").write_bytes(broken)
    with pytest.raises(DataError, match=r"bad\.gz: corrupted or truncated gzip"):
        load_idx_images(tmp_path / "bad.gz")


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_idx_labels(tmp_path / "nope.gz")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: file not found"):
        load_fashion_mnist(tmp_path)


def test_image_label_count_mismatch(tmp_path, images):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_images_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_labels_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range(tmp_path, images):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_images_bytes(images))
        labels = np.array([0, 1, 2, 10, 3])
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_labels_bytes(labels))
    with pytest.raises(DataError, match=r"out of range 0\.\.9: 1 rows, first 10 in row 3"):
        load_fashion_mnist(tmp_path)


# ---- rotation -----------------------------------------------------------------------------


def test_rotation_by_0_and_360_is_identity(images):
    np.testing.assert_allclose(rotate_images(images, 0), images, atol=1e-6)
    np.testing.assert_allclose(rotate_images(images, 360), images, atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_right_angles_equals_rot90(images, k):
    expected = np.rot90(images, k=k, axes=(1, 2))  # counter-clockwise on screen
    np.testing.assert_allclose(rotate_images(images, 90 * k), expected, atol=1e-3)


def test_rotation_75_keeps_a_centred_disc():
    rows, cols = np.mgrid[0:28, 0:28]
    disc = (((rows - 13.5) ** 2 + (cols - 13.5) ** 2) < 8**2).astype(np.float32)[None]  # (1,28,28)
    bar = np.zeros((1, 28, 28), np.float32)
    bar[0, 13:15, 4:24] = 1.0  # horizontal bar
    rotated_disc, rotated_bar = rotate_images(np.concatenate([disc, bar]), 75)
    assert rotated_disc.dtype == np.float32
    assert np.abs(rotated_disc - disc[0]).sum() < 0.1 * disc.sum()  # only the rim blurs
    assert rotated_bar.sum() == pytest.approx(bar.sum(), rel=0.05)
    column_mass, row_mass = rotated_bar.sum(axis=0), rotated_bar.sum(axis=1)
    assert np.count_nonzero(row_mass > 0.1) > np.count_nonzero(column_mass > 0.1)  # now steep


def test_rotation_of_real_images_in_chunks(data_dir):
    _, test = load_fashion_mnist(data_dir)
    images = test.X[:5000].reshape(-1, 28, 28)  # more than one chunk of 4096
    rotated = rotate_images(images, 75)
    assert rotated.shape == images.shape and np.isfinite(rotated).all()
    assert rotated.min() >= 0 and rotated.max() <= 1 + 1e-6
    np.testing.assert_allclose(rotated[4500], rotate_images(images[4500:4501], 75)[0])


def test_rotation_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        rotate_images(np.zeros((10, 784)), 75)


def test_idx_loader_accepts_path_strings(tmp_path: Path, images):
    (tmp_path / "img").write_bytes(idx_images_bytes(images))
    assert load_idx_images(str(tmp_path / "img")).shape == (5, 28, 28)
