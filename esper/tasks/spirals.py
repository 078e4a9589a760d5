"""Interleaved noisy spirals in the plane: a synthetic task that needs a curved boundary."""

from __future__ import annotations

from typing import Literal

import numpy as np

from esper.jobs.spec import Job
from esper.tasks import hosts
from esper.tasks.base import Task, TaskData, check_width, make_job, split

ARMS = 3
PER_ARM = 1000
TURNS = 1.5
NOISE = 0.08


def generate(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ARMS spirals of PER_ARM points each, radius growing with angle, Gaussian jitter."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for arm in range(ARMS):
        t = np.sqrt(rng.uniform(0.0, 1.0, PER_ARM))  # denser towards the rim, like the area
        angle = t * TURNS * 2 * np.pi + arm * 2 * np.pi / ARMS
        pts = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
        xs.append(pts + rng.normal(0.0, NOISE, pts.shape))
        ys.append(np.full(PER_ARM, arm))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def load(seed: int) -> TaskData:
    """Points from generator seed 0 (the task is fixed); 70/15/15 split by `seed`."""
    x, y = generate(0)
    (xtr, ytr), (xv, yv), (xte, yte) = split(x, y, fractions=(0.7, 0.15, 0.15), seed=seed)
    return TaskData(x_train=xtr, y_train=ytr, x_val=xv, y_val=yv, x_test=xte, y_test=yte,
                    num_classes=ARMS)


TASK = Task(
    name="spirals",
    description=f"{ARMS} interleaved noisy spirals in 2-d ({ARMS * PER_ARM} points)",
    load=load,
    hosts={
        # Points have no spatial structure for a convolution to exploit, so spirals
        # offers only an MLP; asking for "cnn" is a config error listing "mlp".
        "mlp": hosts.HostSpec(
            name="mlp",
            description="2 → 8 → 8 → 3 ReLU MLP",
            build=lambda width: hosts.mlp(2, ARMS, hidden=8, width=width),
            default_sites=("act1", "act2"),
        ),
    },
)


def job(*, host: Literal["mlp"] = "mlp", width: float = 1.0, seed: int = 0, batch_size: int = 64) -> Job:
    """Three interleaved noisy spirals in 2-d (3000 points).

    Args:
        host: the host model: "mlp" (2 → 8 → 8 → 3); points have no spatial structure for a CNN.
        width: host width multiplier, in (0, 64].
        seed: split seed (the run's seed).
        batch_size: training batch size (the run's batch size).
    """
    return make_job(TASK, host=host, width=check_width(width), seed=seed, batch_size=batch_size)
