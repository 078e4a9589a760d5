"""Tiny hosts and a zero-output seed for the Kasmina tests."""

from __future__ import annotations

import torch
from torch import nn

from generated.esper.common.v1 import seed_pb2


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1),
        nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4),
    )


def cnn2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )


class TinyBlock(nn.Module):
    """Pre-norm transformer block: attention and MLP, both residual."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, d_in: int = 4, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.block = TinyBlock(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(dim=1))


# name → (factory, example input factory, sites)
HOSTS = {
    "mlp": (mlp, lambda: torch.randn(32, 8), ["1", "3"]),
    "cnn1d": (cnn1d, lambda: torch.randn(16, 1, 12), ["1", "4"]),
    "cnn2d": (cnn2d, lambda: torch.randn(8, 1, 6, 6), ["1", "3"]),
    "transformer": (TinyTransformer, lambda: torch.randn(8, 5, 4), ["block.ln2", "block.mlp"]),
}

# name → parallel sites that go with HOSTS[name]'s output sites: a Linear→ReLU→Linear span
# (8 → 16) and a single Linear (16 → 4); convolutions (8 → 8, 4 → 4); a whole transformer
# block and its MLP's Linear→GELU→Linear span (16 → 16 tokens).
PARALLEL_SITES = {
    "mlp": ["0:2", "4"],
    "cnn1d": ["2"],
    "cnn2d": ["2"],
    "transformer": ["block", "block.mlp.0:2"],
}


class ZeroOutSeed(nn.Module):
    """Channel MLP (1x1 convs for NCL/NCHW, Linear on the last dim for NC/NLD) whose
    output layer starts at zero, so its output is exactly zero at germination."""

    def __init__(self, sig: seed_pb2.SiteSignature, hidden: int = 8) -> None:
        super().__init__()
        c = sig.channels
        if sig.layout == seed_pb2.ACTIVATION_LAYOUT_NCL:
            self.inp, self.out = nn.Conv1d(c, hidden, 1), nn.Conv1d(hidden, c, 1)
        elif sig.layout == seed_pb2.ACTIVATION_LAYOUT_NCHW:
            self.inp, self.out = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        else:
            self.inp, self.out = nn.Linear(c, hidden), nn.Linear(hidden, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(h)))


class LinearSeed(nn.Module):
    """`s = h @ W.T + b` on the last dim, zero at start; tests set W to shape the output."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h)


def train_steps(mm: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, n: int) -> None:
    """`n` plain training steps on a fixed batch with `mean(y**2)` as the loss."""
    for _ in range(n):
        opt.zero_grad()
        mm(x).pow(2).mean().backward()
        opt.step()
        mm.step()
