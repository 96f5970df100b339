"""Fashion-MNIST from the original idx files, and the rotation that makes its drifted version.

idx format (big-endian): images = int32 magic 2051, count, rows, cols, then count*rows*cols
uint8 pixels; labels = int32 magic 2049, count, then count uint8 labels. Files may be gzip'd
(recognised by their first two bytes, not by the name). The CNN follow-up of the paper
pre-trains on Fashion-MNIST and fine-tunes/tests on the images rotated by 75 degrees.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.data.locate import data_file

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
GZIP_MAGIC = b"\x1f\x8b"
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_SIDE = 28
FASHION_MNIST_DRIFT_DEGREES = 75.0
# Images rotated per step: bounds the temporaries of the gather to a few tens of MB.
ROTATE_CHUNK = 4096


def load_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """uint8 (n, rows, cols) from an idx3 image file, plain or gzip'd (a read-only array)."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    count, rows, cols = _idx_header(path, raw, IDX_IMAGES_MAGIC, n_dims=3, kind="idx3 images")
    _check_payload(path, raw, 16, count * rows * cols, f"{count} images of {rows}x{cols}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def load_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """uint8 (n,) from an idx1 label file, plain or gzip'd (a read-only array)."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    (count,) = _idx_header(path, raw, IDX_LABELS_MAGIC, n_dims=1, kind="idx1 labels")
    _check_payload(path, raw, 8, count, f"{count} labels")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from error
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        # EOFError: the gzip stream ends early, i.e. the file was truncated
        raise DataError(f"{path}: corrupted or truncated gzip data ({error})") from error


def _idx_header(path: Path, raw: bytes, magic: int, *, n_dims: int, kind: str) -> tuple[int, ...]:
    """The n_dims sizes after the magic number, which is checked first: a label file passed as
    images should be reported as such, not as a short header."""
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an idx magic number")
    (found,) = struct.unpack(">i", raw[:4])
    if found != magic:
        other = {IDX_IMAGES_MAGIC: "an idx3 image file", IDX_LABELS_MAGIC: "an idx1 label file"}
        hint = f" (that is {other[found]})" if found in other else ""
        raise DataError(f"{path}: magic number {found}{hint}, expected {magic} for {kind}")
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise DataError(
            f"{path}: {len(raw)} bytes, shorter than the {header_size}-byte {kind} header"
        )
    return struct.unpack(f">{n_dims}i", raw[4:header_size])


def _check_payload(path: Path, raw: bytes, header_size: int, expected: int, what: str) -> None:
    have = len(raw) - header_size
    if expected < 0 or have != expected:
        problem = "truncated" if have < expected else "extra bytes after the data"
        raise DataError(
            f"{path}: {have} data bytes, the header promises {what} = {expected} bytes ({problem})"
        )


def load_fashion_mnist(data_dir: str | os.PathLike[str]) -> tuple[Dataset, Dataset]:
    """(train 60,000, test 10,000): X float32 (n, 784) = pixels / 255, y int64 0..9."""
    return _fashion_split(data_dir, "train"), _fashion_split(data_dir, "t10k")


def _fashion_split(data_dir: str | os.PathLike[str], prefix: str) -> Dataset:
    images_path = data_file(data_dir, f"fashion-mnist/{prefix}-images-idx3-ubyte.gz")
    labels_path = data_file(data_dir, f"fashion-mnist/{prefix}-labels-idx1-ubyte.gz")
    images = load_idx_images(images_path)  # (n, 28, 28) uint8
    labels = load_idx_labels(labels_path)  # (n,) uint8
    side = FASHION_MNIST_SIDE
    if images.shape[1:] != (side, side):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected ({side}, {side})")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    pixels = images.reshape(len(images), side * side).astype(np.float32) / np.float32(255)
    meta = {
        "source": str(images_path),
        "class_names": FASHION_MNIST_CLASS_NAMES,
        "image_shape": (side, side),
    }
    return Dataset(pixels, labels.astype(np.int64), len(FASHION_MNIST_CLASS_NAMES), meta)


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """float32 (n, H, W): every image rotated by `degrees` counter-clockwise about its centre.

    Bilinear interpolation; pixels that come from outside the image are 0 (background). Works on
    pixels of any scale (uint8 0..255 or 0..1 floats). degrees=90 equals np.rot90(image).
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"rotate_images expects (n, H, W) images, got shape {images.shape}")
    n, height, width = images.shape
    taps = _bilinear_taps(height, width, degrees)
    rotated = np.empty((n, height, width), dtype=np.float32)  # (n, H, W)
    for start in range(0, n, ROTATE_CHUNK):
        chunk = images[start : start + ROTATE_CHUNK].astype(np.float32)  # (b, H, W)
        out = np.zeros_like(chunk)  # (b, H, W)
        for rows, cols, weight in taps:
            out += chunk[:, rows, cols] * weight  # (b, H, W) gathered * (H, W)
        rotated[start : start + ROTATE_CHUNK] = out
    return rotated


def _bilinear_taps(height: int, width: int, degrees: float) -> list[tuple]:
    """For each output pixel, the 4 source pixels and their weights: 4 x ((H, W), (H, W), (H, W)).

    Inverse mapping: each output pixel looks up where it came from, rotating back by -degrees,
    so every output pixel is filled exactly once (a forward mapping would leave holes).
    """
    theta = np.deg2rad(degrees)
    centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
    out_row, out_col = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")  # (H, W)
    x = out_col - centre_col  # (H, W), x to the right
    y = centre_row - out_row  # (H, W), y up, so positive angles turn counter-clockwise on screen
    source_col = np.cos(theta) * x + np.sin(theta) * y + centre_col  # (H, W)
    source_row = centre_row - (-np.sin(theta) * x + np.cos(theta) * y)  # (H, W)
    row0, col0 = np.floor(source_row), np.floor(source_col)  # (H, W)
    frac_row, frac_col = source_row - row0, source_col - col0  # (H, W)
    taps = []
    for d_row, d_col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        rows, cols = (row0 + d_row).astype(np.intp), (col0 + d_col).astype(np.intp)  # (H, W)
        weight = (frac_row if d_row else 1 - frac_row) * (frac_col if d_col else 1 - frac_col)
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # (H, W)
        taps.append(
            (
                np.clip(rows, 0, height - 1),
                np.clip(cols, 0, width - 1),
                np.where(inside, weight, 0.0).astype(np.float32),
            )
        )
    return taps
