"""Training FLOPs, counted by `torch.utils.flop_counter.FlopCounterMode`.

What counts: the forward and backward pass of every training step (matmuls and
convolutions, which is what `FlopCounterMode` counts). The optimizer update, evaluation
and the controller's counterfactual measurements are not training compute and are not
counted, for every arm alike.

How: the first training step after each topology change runs under `FlopCounterMode`,
which observes the ops without changing their results; that gives forward+backward FLOPs
per sample of the current topology, and every later step adds per-sample FLOPs × its
batch size until the topology changes again (germinate, prune, fossilize, or a
mechanical stage change reported by Kasmina).

Seeds cost compute before they count: a seed in TRAINING runs forward and backward on
every step although the model's output is still the host's (the straight-through
incubator), so a grown model pays for its seeds from germination on, not from blending.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class FlopMeter:
    """Cumulative training FLOPs of a model whose topology changes now and then."""

    def __init__(self) -> None:
        self.total: float = 0.0
        """Forward+backward FLOPs of every training step so far."""
        self.per_sample: float | None = None
        """Forward+backward FLOPs per sample of the current topology (None: not measured yet)."""
        self.measurements: int = 0
        """How many times a step was measured (once per topology)."""

    def invalidate(self) -> None:
        """The topology changed: measure the next step again."""
        self.per_sample = None

    @contextmanager
    def step(self, batch_size: int) -> Iterator[None]:
        """Wrap one training step's forward and backward; adds its FLOPs to `total`."""
        if self.per_sample is None:
            with FlopCounterMode(display=False) as counter:
                yield
            self.per_sample = counter.get_total_flops() / batch_size
            self.measurements += 1
        else:
            yield
        self.total += self.per_sample * batch_size

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total = float(state["total"])
        self.per_sample = None


def train_flops_per_sample(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Forward+backward FLOPs per sample of one step on (x, y), gradients discarded.

    Uses `torch.autograd.grad` so no `.grad` is touched; for sizing models outside a run.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(model(x), y)
        torch.autograd.grad(loss, params, allow_unused=True)
    return counter.get_total_flops() / x.shape[0]
