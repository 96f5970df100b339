"""A simulated fleet of camera devices: Fashion-MNIST, one rotation per device, a small CNN.

The base model (the standard CNN of agent/trainer/cnn/arch.py) is pre-trained on upright train
images. Device i sees its own rotation, ROTATIONS[i % 3] (0°, 30°, 75°: a camera mounted
straight, tilted, turned), on its own disjoint shard of other train images: 1,365 images, so
the agent's default hold-out of a quarter leaves the CNN follow-up's 1,024 to fine-tune on.
With a drift event, a tilted device starts upright and its camera turns at the switch
(X_drift holds its rotated images); the upright device has nothing to drift to.
"""

from __future__ import annotations

import numpy as np

from agent.data.errors import DataError
from agent.data.fashion_mnist import FASHION_MNIST_CLASS_NAMES, load_fashion_mnist
from agent.data.fmnist_tasks import rotate_rows

ROTATIONS = (0, 30, 75)  # degrees, device by device
PRETRAIN_IMAGES = 12_000
DEVICE_IMAGES = 1_365  # 1,024 to train on after the agent's 25 % hold-out
ARCHITECTURE = "cnn"
CALIBRATION_STREAMS = 8


def fmnist_fleet(n_devices: int, data_dir, drift: bool, seed: int = 0):
    """(pre-training (X, y, streams, info), [(device id, arrays, description)], description,
    newcomers): no devices joining later. Images have no time order: the pre-training images
    (in random order) are cut into CALIBRATION_STREAMS streams the calibration holds blocks of
    out, as a fan's recordings are."""
    train, _ = load_fashion_mnist(data_dir)
    order = np.random.default_rng(seed).permutation(len(train))
    needed = PRETRAIN_IMAGES + n_devices * DEVICE_IMAGES
    if needed > len(train):
        most = (len(train) - PRETRAIN_IMAGES) // DEVICE_IMAGES
        raise DataError(f"{n_devices} devices need {needed} Fashion-MNIST train images, there "
                        f"are {len(train)}: at most {most} devices")  # fmt: skip
    pre = order[:PRETRAIN_IMAGES]
    shards = order[PRETRAIN_IMAGES:needed].reshape(n_devices, DEVICE_IMAGES)
    repeats = n_devices > len(ROTATIONS)
    devices = []
    for i, rows in enumerate(shards):
        degrees = ROTATIONS[i % len(ROTATIONS)]
        device_id = f"fmnist-r{degrees:02d}" + (f"-{i // len(ROTATIONS)}" if repeats else "")
        rotated = rotate_rows(train.X[rows], degrees) if degrees else train.X[rows]
        if drift and degrees:  # upright first, the camera turns at the switch
            arrays = {"X": train.X[rows], "y": train.y[rows], "X_drift": rotated,
                      "y_drift": train.y[rows]}  # fmt: skip
            what = f"camera upright -> turned {degrees}°"
        else:
            arrays = {"X": rotated, "y": train.y[rows]}
            what = f"camera turned {degrees}°" if degrees else "camera upright"
        devices.append((device_id, arrays, what))
    info = {"task": "fmnist", "class_names": list(FASHION_MNIST_CLASS_NAMES),
            "features": "pixels / 255, 28 x 28", "architecture": ARCHITECTURE}  # fmt: skip
    description = (
        f"fmnist: a CNN pre-trained on {PRETRAIN_IMAGES} upright images; each device sees its "
        f"own rotation of {DEVICE_IMAGES} others ({', '.join(f'{r}°' for r in ROTATIONS)})"
    )
    streams = np.arange(len(pre)) * CALIBRATION_STREAMS // len(pre)  # (n,) stream of each image
    return (train.X[pre], train.y[pre], streams, info), devices, description, []
