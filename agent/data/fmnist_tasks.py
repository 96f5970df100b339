"""The CNN benchmark's two Fashion-MNIST tasks, every split drawn from one seed.

Rotation (the Skip2-LoRA CNN follow-up): the fine-tune set is 1,024 images of the 60,000-image
train split, chosen by `np.random.default_rng(seed).permutation(60000)[:1024]` and rotated by
75° (bilinear, `rotate_images`); pre-training uses the other 58,976 train images upright (or
the first `n_pretrain` of them in that permutation's order); the test set is all 10,000 test
images rotated by 75°.

Unseen classes (the PEFT study's second task): pre-training sees only the 8 classes other than
`NEW_CLASSES` (Bag, Ankle boot), from the train images outside the fine-tune set; the device
fine-tunes on 1,024 train images of all 10 classes (drawn as above, upright) and is tested on
all 10,000 test images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from agent.data.dataset import Dataset
from agent.data.fashion_mnist import (
    FASHION_MNIST_DRIFT_DEGREES,
    FASHION_MNIST_SIDE,
    load_fashion_mnist,
    rotate_images,
)

FINETUNE_SAMPLES = 1024
NEW_CLASSES = (8, 9)  # Bag, Ankle boot: the two classes only the devices see
TASKS = ("fmnist-rot75", "fmnist-unseen")


@dataclass(frozen=True)
class FmnistTask:
    name: str
    pretrain: Dataset  # labels 0..n_pretrain_classes-1
    finetune: Dataset  # labels 0..9
    test: Dataset  # labels 0..9
    n_pretrain_classes: int
    description: str


def rotate_rows(X: np.ndarray, degrees: float) -> np.ndarray:
    """Rows of 28×28 pixels, each image rotated by `degrees` about its centre."""
    side = FASHION_MNIST_SIDE
    return rotate_images(X.reshape(-1, side, side), degrees).reshape(len(X), side * side)


def split_rows(n_train: int, seed: int, n_finetune: int = FINETUNE_SAMPLES):
    """(fine-tune rows, pre-training rows) of the train split for a seed: one permutation."""
    order = np.random.default_rng(seed).permutation(n_train)
    return order[:n_finetune], order[n_finetune:]


def load_fmnist_task(data_dir: str | os.PathLike[str], name: str, *, seed: int = 0,
                     n_finetune: int = FINETUNE_SAMPLES,
                     n_pretrain: int | None = None) -> FmnistTask:  # fmt: skip
    if name not in TASKS:
        raise ValueError(f"unknown Fashion-MNIST task {name!r}: choose {' or '.join(TASKS)}")
    train, test = load_fashion_mnist(data_dir)
    tuned, rest = split_rows(len(train), seed, n_finetune)
    rest = rest[:n_pretrain]
    if name == "fmnist-rot75":
        degrees = FASHION_MNIST_DRIFT_DEGREES
        finetune = _rotated(train.subset(tuned), degrees)
        description = (
            f"pre-train on {len(rest)} upright train images; fine-tune on {n_finetune} train "
            f"images (permutation seed {seed}) rotated {degrees:g}°; test on the "
            f"{len(test)} test images rotated {degrees:g}°"
        )
        return FmnistTask(name, train.subset(rest), finetune, _rotated(test, degrees), 10,
                          description)  # fmt: skip
    known = rest[~np.isin(train.y[rest], NEW_CLASSES)]
    pretrain = train.subset(known)
    n_known = 10 - len(NEW_CLASSES)
    pretrain = Dataset(pretrain.X, pretrain.y, n_known, pretrain.meta)  # labels 0..7 only
    description = (
        f"pre-train on {len(known)} train images of the {n_known} classes other than "
        f"{list(NEW_CLASSES)}; fine-tune on {n_finetune} train images of all 10 (permutation "
        f"seed {seed}); test on the {len(test)} test images"
    )
    return FmnistTask(name, pretrain, train.subset(tuned), test, n_known, description)


def _rotated(data: Dataset, degrees: float) -> Dataset:
    meta = {**data.meta, "rotation_degrees": degrees}
    return Dataset(rotate_rows(data.X, degrees), data.y, data.n_classes, meta)
