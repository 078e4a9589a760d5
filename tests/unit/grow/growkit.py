"""Tiny hosts, data and a user-style training loop for the esper.grow tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.grow import BuiltinKernels, Grower, GrowthConfig, KasminaConfig, fixed_controller

FAST = KasminaConfig(incubation=3, gate_interval=2, blend_duration=6, embargo_epochs=0, stats_interval=2)
"""Seeds move TRAINING → BLENDING → HOLDING within two short epochs."""


class ResidualMLP(nn.Module):
    """Not a Sequential: a stem, residual blocks in a ModuleList, a head."""

    def __init__(self, d_in: int = 8, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class BatchNormCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TinyEncoder(nn.Module):
    """Token embedding, a two-layer nn.TransformerEncoder, mean pool, head."""

    def __init__(self, vocab: int = 12, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def tabular_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@dataclass
class Case:
    """A host, its sites, its data and its loss."""

    name: str
    build: Callable[[], nn.Module]
    sites: list[Any]
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[Any, Any], torch.Tensor]
    blueprints: tuple[str, ...]


def _classes(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(x[0].numel(), 3, generator=g)
    return (x.flatten(1).float() @ w).argmax(1)


def cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    tab = torch.randn(96, 8, generator=g)
    img = torch.randn(96, 1, 6, 6, generator=g)
    tok = torch.randint(0, 12, (96, 5), generator=g)
    reg = torch.randn(96, 8, generator=g)
    return {
        "tabular_mlp": Case("tabular_mlp", tabular_mlp, ["1", "3"], tab, _classes(tab),
                            F.cross_entropy, ("bottleneck_mlp",)),
        "residual_mlp": Case("residual_mlp", ResidualMLP, ["blocks.*.1"], tab, _classes(tab),
                             F.cross_entropy, ("lowrank_adapter",)),
        "batchnorm_cnn": Case("batchnorm_cnn", BatchNormCNN, [nn.ReLU], img, _classes(img),
                              F.cross_entropy, ("conv3x3_residual",)),
        "transformer": Case("transformer", TinyEncoder, [nn.TransformerEncoderLayer], tok,
                            tok.sum(1) % 3, F.cross_entropy, ("bottleneck_mlp",)),
        "regression_mse": Case("regression_mse", lambda: nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), ["1"], reg,
            reg[:, :1] * reg[:, 1:2], F.mse_loss, ("bottleneck_mlp",)),
    }


def loader(case: Case, batch: int = 16, seed: int = 0) -> DataLoader:
    train = TensorDataset(case.x[32:], case.y[32:])
    return DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def held_out(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return case.x[:32], case.y[:32]


def make_grower(case: Case, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                scheduler: Any = None, controller: Any = None, kasmina: KasminaConfig = FAST,
                config: GrowthConfig | None = None, events: list | None = None, **kw: Any) -> Grower:
    return Grower(
        model, sites=case.sites, example_input=case.x[:4], optimizer=optimizer,
        scheduler=scheduler, loss_fn=case.loss_fn, held_out=held_out(case),
        controller=controller if controller is not None else fixed_controller(
            germinate_epochs=(1,), fossilize_after_epochs=1),
        kernels=BuiltinKernels(list(case.blueprints)), kasmina=kasmina,
        config=config or GrowthConfig(max_seeds=2), event_sink=None if events is None else events.append,
        **kw,
    )


def train_epoch(model: nn.Module, grower: Grower | None, data: DataLoader,
                optimizer: torch.optim.Optimizer, loss_fn: Callable, scheduler: Any = None) -> float:
    """The user's own loop for one epoch; returns the mean training loss."""
    model.train()
    total, n = 0.0, 0
    for xb, yb in data:
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
        if grower is not None:
            grower.step()
        total += float(loss.detach()) * len(yb)
        n += len(yb)
    return total / n


@torch.no_grad()
def evaluate(model: nn.Module, case: Case) -> float:
    model.eval()
    x, y = held_out(case)
    loss = float(case.loss_fn(model(x), y))
    model.train()
    return loss
