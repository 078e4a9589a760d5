"""The growth suite's data: MNIST-1D from other generator seeds/noise, the sequence task."""

from __future__ import annotations

import pytest
import torch

from esper.jobs.errors import JobConfigError
from esper.tasks import mnist1d, sequence


def test_mnist1d_variant_differs_from_default_and_is_deterministic() -> None:
    default = mnist1d.TASK.load(0)
    other = mnist1d.variant(1, 1.5).load(0)
    assert default.x_train.shape == other.x_train.shape
    assert not torch.equal(default.x_train, other.x_train)
    assert torch.equal(other.x_train, mnist1d.variant(1, 1.5).load(0).x_train)
    assert mnist1d.variant(mnist1d.DEFAULT_GENERATOR_SEED, 1.0) is mnist1d.TASK


def test_mnist1d_variant_rejects_bad_values() -> None:
    with pytest.raises(JobConfigError, match="generator_seed"):
        mnist1d.variant(-1, 1.0)
    with pytest.raises(JobConfigError, match="noise"):
        mnist1d.variant(1, -0.5)


def test_sequence_job_builds_and_seeds_give_disjoint_data() -> None:
    job = sequence.job(seed=0)
    assert job.model(job.example_input).shape == (8, sequence.CLASSES)
    a, b = sequence.load(0), sequence.load(100)
    assert not torch.equal(a.x_train, b.x_train)
    y = a.y_train
    assert int(y.min()) >= 0 and int(y.max()) < sequence.CLASSES
