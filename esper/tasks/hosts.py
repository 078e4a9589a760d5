"""Deliberately small host models with named seed sites.

Hosts are small on purpose: a growth controller can only show what it is worth when
the host leaves accuracy on the table. Every layer has a stable name (an `OrderedDict`
`nn.Sequential`), and those names are the seed sites a run config may list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def scaled(base: int, width: float) -> int:
    """Channels of a layer whose width at multiplier 1.0 is `base` (at least 1)."""
    return max(1, round(base * width))


@dataclass(kw_only=True, frozen=True)
class HostSpec:
    """A host architecture a task offers."""

    name: str
    """Registry name within the task ("mlp", "cnn")."""
    description: str
    """One line for listings."""
    build: Callable[[float], nn.Module]
    """width multiplier → a freshly initialised model (uses torch's global RNG)."""
    default_sites: tuple[str, ...]
    """Module names where seed slots go when a run lists none."""


def mlp(in_features: int, classes: int, *, hidden: int, width: float) -> nn.Sequential:
    """flatten → fc1 → act1 → fc2 → act2 → head; seeds fit at act1 and act2 (N, hidden)."""
    h = scaled(hidden, width)
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_features, h),
            act1=nn.ReLU(),
            fc2=nn.Linear(h, h),
            act2=nn.ReLU(),
            head=nn.Linear(h, classes),
        )
    )


def cnn1d(length: int, classes: int, *, channels: int, width: float) -> nn.Sequential:
    """Two conv blocks and a linear head over (N, 1, length); seeds fit at act1 and act2."""
    c = scaled(channels, width)
    pooled = length // 4
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv1d(1, c, kernel_size=5, padding=2),
            act1=nn.ReLU(),
            pool1=nn.MaxPool1d(2),
            conv2=nn.Conv1d(c, c, kernel_size=3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool1d(2),
            flatten=nn.Flatten(),
            head=nn.Linear(c * pooled, classes),
        )
    )


def cnn2d(side: int, classes: int, *, channels: int, width: float) -> nn.Sequential:
    """Two 3×3 conv blocks and a linear head over (N, 1, side, side); seeds at act1, act2."""
    c = scaled(channels, width)
    pooled = side // 4
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, c, kernel_size=3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c, c, kernel_size=3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            head=nn.Linear(c * pooled * pooled, classes),
        )
    )
