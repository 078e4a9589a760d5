"""scikit-learn's 8×8 handwritten digits (1797 images, shipped with the package)."""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

from esper.jobs.spec import Job
from esper.tasks import hosts
from esper.tasks.base import Task, TaskData, check_width, make_job, split

SIDE = 8
CLASSES = 10


@functools.cache
def images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; scale to [0, 1] so default learning rates behave.
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def load(seed: int) -> TaskData:
    """70/15/15 train/val/test as (N, 1, 8, 8) images."""
    x, y = images()
    (xtr, ytr), (xv, yv), (xte, yte) = split(x[:, None], y, fractions=(0.7, 0.15, 0.15), seed=seed)
    return TaskData(x_train=xtr, y_train=ytr, x_val=xv, y_val=yv, x_test=xte, y_test=yte,
                    num_classes=CLASSES)


TASK = Task(
    name="digits",
    description="scikit-learn digits: 10 classes of 8×8 images (1797 examples)",
    load=load,
    hosts={
        "mlp": hosts.HostSpec(
            name="mlp",
            description="64 → 8 → 8 → 10 ReLU MLP",
            build=lambda width: hosts.mlp(SIDE * SIDE, CLASSES, hidden=8, width=width),
            default_sites=("act1", "act2"),
        ),
        "cnn": hosts.HostSpec(
            name="cnn",
            description="two 3×3 Conv2d blocks of 2 channels and a linear head",
            build=lambda width: hosts.cnn2d(SIDE, CLASSES, channels=2, width=width),
            default_sites=("act1", "act2"),
        ),
    },
)


def job(*, host: Literal["mlp", "cnn"] = "cnn", width: float = 1.0, seed: int = 0, batch_size: int = 64) -> Job:
    """scikit-learn digits: 10 classes of 8×8 images (1797 examples).

    Args:
        host: the host model: "cnn" (two 3×3 Conv2d blocks of 2 channels) or "mlp" (64 → 8 → 8 → 10).
        width: host width multiplier, in (0, 64].
        seed: split seed (the run's seed).
        batch_size: training batch size (the run's batch size).
    """
    return make_job(TASK, host=host, width=check_width(width), seed=seed, batch_size=batch_size)
