"""`Job`: what a job function returns: model, data, loss, metric and where seeds may grow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from esper.jobs.errors import JobBuildError


@dataclass(kw_only=True)
class Job:
    """One training job, as built by a job function for its parameters.

    The trainer iterates the loaders as they are; a sampler (or batch sampler) with
    `set_epoch(epoch)` (like `DistributedSampler`, or `esper.jobs.data.ShuffledBatches`)
    is told each epoch, which makes a resumed run replay the same batch order.
    """

    model: nn.Module
    """The host model, freshly initialised (the run's seed is set before the job builds it)."""
    train_loader: DataLoader
    """Training batches of (input, target); must have a length (batches per epoch)."""
    val_loader: DataLoader
    """Validation batches: loss and metric at each epoch boundary, the controller's signal."""
    test_loader: DataLoader | None = None
    """Test batches, evaluated once at the end; None: no test figures."""
    loss_fn: Callable[[Any, Any], Tensor]
    """(model output, target) -> scalar loss (mean over the batch)."""
    metric_fn: Callable[[Any, Any], float] | None
    """(model output, target) -> accuracy-like figure, higher is better (mean over the batch);
    None: the run reports no accuracy."""
    example_input: Any
    """One batch of inputs (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs): Kasmina records each site's signature from it."""
    sites: Sequence[str | type[nn.Module]]
    """Where seeds may grow: module-name patterns (fnmatch) and/or module types. A run's
    `sites` overrides them."""
    name: str = ""
    """The registered name (set by the registry when it builds the job)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.model, nn.Module):
            problems.append(f"model is a {type(self.model).__name__}, not an nn.Module")
        for name in ("train_loader", "val_loader"):
            if not isinstance(getattr(self, name), DataLoader):
                problems.append(f"{name} is a {type(getattr(self, name)).__name__}, not a DataLoader")
        if self.test_loader is not None and not isinstance(self.test_loader, DataLoader):
            problems.append(f"test_loader is a {type(self.test_loader).__name__}, not a DataLoader")
        if not callable(self.loss_fn):
            problems.append("loss_fn is not callable")
        if self.metric_fn is not None and not callable(self.metric_fn):
            problems.append("metric_fn is neither callable nor None")
        if self.example_input is None:
            problems.append("example_input is None (one batch of inputs is needed)")
        if isinstance(self.sites, str) or not self.sites or not all(
            (isinstance(s, str) and s) or (isinstance(s, type) and issubclass(s, nn.Module))
            for s in self.sites
        ):
            problems.append(f"sites={self.sites!r} must be a non-empty list of module-name "
                            "patterns and/or nn.Module types")
        if problems:
            raise JobBuildError(f"job {self.name or '(unnamed)'}: " + "; ".join(problems))
        self.sites = tuple(self.sites)
