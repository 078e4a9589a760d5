"""Job functions for the registry and trainer tests (registered by target string, as an
operator would register their own)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from esper.jobs import Job
from esper.jobs.data import tensor_loader


class TwoBranch(nn.Module):
    """Not a Sequential: two named branches, summed, then a head."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.left = nn.Linear(4, hidden)
        self.right = nn.Linear(4, hidden)
        self.mix = nn.Tanh()
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.left(x) + self.right(x)))


def tiny(*, hidden: int = 6, rows: int = 96, mode: Literal["sum", "xor"] = "sum",
         noise: float | None = None, verbose: bool = False, seed: int = 0,
         batch_size: int = 32) -> Job:
    """A 4-feature two-class toy with a two-branch model.

    Args:
        hidden: width of both branches.
        rows: examples in the training split
            (validation gets a quarter of that).
        mode: the labelling rule.
        noise: input noise scale; None: none.
        verbose: unused, for the bool coercion test.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows + rows // 4, 4, generator=g)
    if noise is not None:
        x = x + noise * torch.randn(x.shape, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) if mode == "xor" else (x.sum(1) > 0)).long()
    n = rows
    return Job(
        model=TwoBranch(hidden),
        train_loader=tensor_loader(x[:n], y[:n], batch_size=batch_size, shuffle=True, seed=seed),
        val_loader=tensor_loader(x[n:], y[n:], batch_size=1024, shuffle=False),
        loss_fn=F.cross_entropy,
        metric_fn=lambda out, t: float((out.argmax(1) == t).float().mean()),
        example_input=x[:8],
        sites=[nn.Tanh],
    )


def required(*, size: int) -> Job:
    """Needs its one parameter."""
    raise AssertionError("never built in the tests")


def broken(*, fail: bool = True) -> Job:
    """Raises while building, like a job whose data is missing."""
    raise FileNotFoundError("/data/train.csv: no such file (the job's own error)")


def not_a_job() -> dict:
    """Returns the wrong thing."""
    return {"model": None}


def bad_signature(*args: int) -> Job:
    raise AssertionError


def unannotated(*, x=1) -> Job:
    raise AssertionError


def bad_type(*, x: list[int] = []) -> Job:  # noqa: B006
    raise AssertionError
