"""What a task is: data splits fixed by a seed, the hosts it offers, and the job it makes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from esper.jobs.data import tensor_loader
from esper.jobs.errors import JobConfigError
from esper.jobs.sites import module_names, resolve_sites
from esper.jobs.spec import Job
from esper.tasks.hosts import HostSpec


@dataclass(kw_only=True, frozen=True)
class TaskData:
    """Train/validation/test splits as float32 inputs and int64 labels (CPU tensors)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (no batch dimension)."""
        return tuple(self.x_train.shape[1:])


@dataclass(kw_only=True, frozen=True)
class Task:
    """A classification task with fixed splits and small hosts."""

    name: str
    description: str
    load: Callable[[int], TaskData]
    """split seed → data; the same seed always gives the same splits."""
    hosts: Mapping[str, HostSpec]

    def host(self, name: str) -> HostSpec:
        try:
            return self.hosts[name]
        except KeyError:
            raise JobConfigError(
                f"task {self.name!r} has no host {name!r}; available: {', '.join(self.hosts)}",
                field="host",
            ) from None


def split(x: np.ndarray, y: np.ndarray, *, fractions: Sequence[float], seed: int) -> list[
    tuple[torch.Tensor, torch.Tensor]
]:
    """Shuffle with `seed` and cut into consecutive parts of the given fractions.

    The last part takes the remainder, so every example lands in exactly one part.
    """
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    parts, start = [], 0
    for i, f in enumerate(fractions):
        end = len(y) if i == len(fractions) - 1 else start + round(f * len(y))
        parts.append(
            (torch.as_tensor(x[start:end], dtype=torch.float32),
             torch.as_tensor(y[start:end], dtype=torch.int64))
        )
        start = end
    return parts


def make_job(task: Task, *, host: str, width: float, seed: int, batch_size: int) -> Job:
    """The task as a `Job`: its splits for `seed`, a fresh host, cross-entropy and accuracy.

    The host is initialised from torch's global RNG (the trainer seeds it with the run's
    seed before building a job). Batches are `esper.jobs.data.tensor_loader`s: training
    reshuffled per epoch from (seed, epoch); evaluation in order, 1024 rows at a time.
    """
    spec = task.host(host)
    data = task.load(seed)
    model = spec.build(width)
    return Job(
        model=model,
        train_loader=tensor_loader(data.x_train, data.y_train, batch_size=batch_size,
                                   shuffle=True, seed=seed),
        val_loader=tensor_loader(data.x_val, data.y_val, batch_size=EVAL_BATCH, shuffle=False),
        test_loader=tensor_loader(data.x_test, data.y_test, batch_size=EVAL_BATCH, shuffle=False),
        loss_fn=F.cross_entropy,
        metric_fn=accuracy,
        example_input=data.x_train[:8],
        sites=spec.default_sites,
        name=task.name,
    )


def check_width(width: float) -> float:
    """`width` if it is a usable host width multiplier, else `JobConfigError`."""
    if not 0 < width <= 64:
        raise JobConfigError(f"job_params.width: {width!r} must be > 0 and <= 64",
                             field="job_params.width")
    return width


EVAL_BATCH = 1024
"""Rows per evaluation batch (every built-in split fits in one)."""


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the target."""
    return float((logits.argmax(1) == target).float().mean())


__all__ = ["Task", "TaskData", "accuracy", "check_width", "make_job", "module_names", "resolve_sites", "split"]
