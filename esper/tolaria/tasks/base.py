"""What a task is: data splits fixed by a seed, and the hosts it offers."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from esper.tolaria.config import RunConfigError
from esper.tolaria.tasks.hosts import HostSpec


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
            raise RunConfigError(
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


def module_names(model: nn.Module) -> list[str]:
    """Names of every submodule (the root excluded), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_sites(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names matching the site patterns, in the model's order.

    Raises:
        RunConfigError: a pattern matches no module (the message lists the names
            available), field `sites[i]`.
    """
    names = module_names(model)
    chosen: list[str] = []
    for i, pattern in enumerate(patterns):
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise RunConfigError(
                f"site {pattern!r} matches no module of the host; available: {', '.join(names)}",
                field=f"sites[{i}]",
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]
