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

from esper.jobs.errors import JobConfigError
from esper.jobs.spec import Job
from esper.tasks import hosts
from esper.tasks.base import Task, TaskData, check_width, make_job, split

LENGTH = 40
CLASSES = 10


DEFAULT_GENERATOR_SEED = 42
"""The `mnist1d` package's own generator seed (`get_dataset_args().seed`)."""


@functools.cache
def generated(generator_seed: int = DEFAULT_GENERATOR_SEED, noise: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The data set the package's generator makes with `generator_seed`, its correlated and
    i.i.d. noise scales multiplied by `noise` (42 and 1.0: the package's default data)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = generator_seed
    args.corr_noise_scale *= noise
    args.iid_noise_scale *= noise
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load(seed: int, generator_seed: int = DEFAULT_GENERATOR_SEED, noise: float = 1.0) -> TaskData:
    """The package's 4000/1000 train/test split; 10% of train held out for validation."""
    x, y, x_test, y_test = generated(generator_seed, noise)
    (x_train, y_train), (x_val, y_val) = split(x[:, None, :], y, fractions=(0.9, 0.1), seed=seed)
    (x_test_t, y_test_t), = split(x_test[:, None, :], y_test, fractions=(1.0,), seed=0)
    return TaskData(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                    x_test=x_test_t, y_test=y_test_t, num_classes=CLASSES)


HOSTS = {
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
}
TASK = Task(
    name="mnist1d",
    description="MNIST-1D: 10 classes of length-40 signals (4000 train / 1000 test)",
    load=load,
    hosts=HOSTS,
)


def variant(generator_seed: int, noise: float) -> Task:
    """MNIST-1D made by the package's generator with another seed and noise scale (the
    growth suite's out-of-sample data); same hosts and splits as the default task."""
    if isinstance(generator_seed, bool) or not isinstance(generator_seed, int) or generator_seed < 0:
        raise JobConfigError(f"mnist1d generator_seed={generator_seed!r} must be an integer >= 0",
                             field="generator_seed")
    if not 0.0 <= noise <= 10.0:
        raise JobConfigError(f"mnist1d noise={noise!r} must be in [0, 10]", field="noise")
    if generator_seed == DEFAULT_GENERATOR_SEED and noise == 1.0:
        return TASK
    return Task(name=f"mnist1d-g{generator_seed}-n{noise:g}",
                description=f"MNIST-1D, generator seed {generator_seed}, noise x{noise:g}",
                load=functools.partial(load, generator_seed=generator_seed, noise=noise),
                hosts=HOSTS)


def job(*, host: Literal["mlp", "cnn"] = "cnn", width: float = 1.0, seed: int = 0, batch_size: int = 64,
        generator_seed: int = DEFAULT_GENERATOR_SEED, noise: float = 1.0) -> Job:
    """MNIST-1D: 10 classes of length-40 signals (4000 train / 1000 test), generated offline.

    Args:
        host: the host model: "cnn" (two Conv1d blocks of 4 channels) or "mlp" (40 → 16 → 16 → 10).
        width: host width multiplier, in (0, 64].
        seed: split seed (the run's seed).
        batch_size: training batch size (the run's batch size).
        generator_seed: the `mnist1d` generator's seed (42: the package's default data).
        noise: multiplier of the generator's noise scales (1.0: the package's).
    """
    return make_job(variant(generator_seed, noise), host=host, width=check_width(width), seed=seed, batch_size=batch_size)
