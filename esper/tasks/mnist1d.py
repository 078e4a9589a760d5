"""MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package.

`mnist1d.data.make_dataset(get_dataset_args())` synthesises the signals from ten
templates; it never downloads (only `get_dataset` does, which is not used here). The
package seeds Python's and NumPy's global RNGs, so their states are restored after.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

import numpy as np

from esper.jobs.spec import Job
from esper.tasks import hosts
from esper.tasks.base import Task, TaskData, check_width, make_job, split

LENGTH = 40
CLASSES = 10


@functools.cache
def generated() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load(seed: int) -> TaskData:
    """The package's 4000/1000 train/test split; 10% of train held out for validation."""
    x, y, x_test, y_test = generated()
    (x_train, y_train), (x_val, y_val) = split(x[:, None, :], y, fractions=(0.9, 0.1), seed=seed)
    (x_test_t, y_test_t), = split(x_test[:, None, :], y_test, fractions=(1.0,), seed=0)
    return TaskData(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                    x_test=x_test_t, y_test=y_test_t, num_classes=CLASSES)


TASK = Task(
    name="mnist1d",
    description="MNIST-1D: 10 classes of length-40 signals (4000 train / 1000 test)",
    load=load,
    hosts={
        "mlp": hosts.HostSpec(
            name="mlp",
            description="40 → 16 → 16 → 10 ReLU MLP",
            build=lambda width: hosts.mlp(LENGTH, CLASSES, hidden=16, width=width),
            default_sites=("act1", "act2"),
        ),
        "cnn": hosts.HostSpec(
            name="cnn",
            description="two Conv1d blocks of 4 channels and a linear head",
            build=lambda width: hosts.cnn1d(LENGTH, CLASSES, channels=4, width=width),
            default_sites=("act1", "act2"),
        ),
    },
)


def job(*, host: Literal["mlp", "cnn"] = "cnn", width: float = 1.0, seed: int = 0, batch_size: int = 64) -> Job:
    """MNIST-1D: 10 classes of length-40 signals (4000 train / 1000 test), generated offline.

    Args:
        host: the host model: "cnn" (two Conv1d blocks of 4 channels) or "mlp" (40 → 16 → 16 → 10).
        width: host width multiplier, in (0, 64].
        seed: split seed (the run's seed).
        batch_size: training batch size (the run's batch size).
    """
    return make_job(TASK, host=host, width=check_width(width), seed=seed, batch_size=batch_size)
