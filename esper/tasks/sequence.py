"""A generated sequence task for a small transformer (no download).

Sequences of 12 tokens over a vocabulary of 8; the label is how many of the other 11 tokens
equal the first one, capped at 3 (4 classes). It needs attention (compare every token with
the first) and a non-linear read-out (count): the task of `examples/grow_transformer.py`.
The data set is drawn from the split seed itself, so different seeds give disjoint
samples (the growth suite tunes on seeds >= 100 and reports seeds 0..n-1).

The host is a one-block pre-norm transformer of width 8 with named parts, so seeds can
grow at the residual stream (`block`, an output slot), beside the MLP (`block.mlp`, a
parallel slot) and beside the attention (`block.attn`, a parallel slot). Inputs are
int64 token ids (not float32 like the other tasks).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from esper.jobs.spec import Job
from esper.tasks import hosts
from esper.tasks.base import Task, TaskData, check_width, make_job

VOCAB, LENGTH, CLASSES = 8, 12, 4
SIZES = (3000, 600, 1000)
"""train / validation / test rows."""


def load(seed: int) -> TaskData:
    """Fresh sequences drawn from `seed` (train, validation and test from one stream)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = (x[:, 1:] == x[:, :1]).sum(1).clamp(max=CLASSES - 1)
    a, b = SIZES[0], SIZES[0] + SIZES[1]
    return TaskData(x_train=x[:a], y_train=y[:a], x_val=x[a:b], y_val=y[a:b],
                    x_test=x[b:], y_test=y[b:], num_classes=CLASSES)


class SelfAttention(nn.Module):
    """Multi-head self-attention as a one-tensor module (N, L, D) → (N, L, D), so a
    parallel slot can wrap it."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token + position embedding, one `Block`, read-out at the first token."""

    def __init__(self, d: int = 8, heads: int = 1, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(LENGTH, d) * 0.1)
        self.block = Block(d, heads, hidden)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens) + self.pos)[:, 0])


TASK = Task(
    name="sequence",
    description="count the first token's repeats in 12 tokens over 8 (4 classes), generated",
    load=load,
    hosts={
        "transformer": hosts.HostSpec(
            name="transformer",
            description="one pre-norm block of width 8, 1 head, MLP 16; read-out at token 0",
            build=lambda width: TinyTransformer(d=hosts.scaled(8, width), heads=1,
                                                hidden=hosts.scaled(16, width)),
            default_sites=("block",),
        ),
    },
)


def job(*, host: Literal["transformer"] = "transformer", width: float = 1.0, seed: int = 0,
        batch_size: int = 64) -> Job:
    """Count the first token's repeats in a 12-token sequence (4 classes), generated.

    Args:
        host: the host model: "transformer" (one pre-norm block of width 8).
        width: host width multiplier, in (0, 64].
        seed: data and split seed (the run's seed).
        batch_size: training batch size (the run's batch size).
    """
    return make_job(TASK, host=host, width=check_width(width), seed=seed, batch_size=batch_size)
