"""The optimizer and the learning-rate schedule a run's `OptimizerConfig` describes.

Both are plain torch objects, built here and handed to the trainer (which hands them to
`esper.grow.Grower`: seed param groups join the optimizer at germination, and the
scheduler's per-group state follows them in and out):

    optimizer = build_optimizer(config.optimizer, job.model.parameters())
    scheduler = build_scheduler(config.optimizer, optimizer, steps_per_epoch=..., epochs=...)

The schedule is a `LambdaLR` over `StepSchedule`, stepped once per batch position of the
run (`last_epoch` is that position), so it saves and loads with `state_dict()` like any
torch scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from esper.tolaria.config import OptimizerConfig


def build_optimizer(config: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over `params`, at the peak learning rate.

    Build it over the host's parameters only: seeds join it at germination.
    """
    params = list(params)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


class StepSchedule:
    """Multiplier of the peak learning rate at each batch position of a run (0-based).

    Linear warm-up over `warmup_steps`, then constant or cosine. Cosine reaches exactly 0
    at the run's last step, so every arm of a comparison ends fully decayed at the same
    point whatever it grew. A callable object (not a lambda): `LambdaLR.state_dict()` keeps
    its settings.
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, cosine: bool) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - 1 - warm)
        progress = min(1.0, (step - warm) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, *,
                    steps_per_epoch: int, epochs: int) -> LambdaLR:
    """The schedule of `config` over a run of `epochs` × `steps_per_epoch` batch positions."""
    schedule = StepSchedule(warmup_steps=config.warmup_epochs * steps_per_epoch,
                            total_steps=epochs * steps_per_epoch, cosine=config.schedule == "cosine")
    return LambdaLR(optimizer, schedule)
