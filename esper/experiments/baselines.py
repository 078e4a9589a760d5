"""The static-final baseline: the topology a controller grew, trained from scratch.

`attach_grown_seeds(host, seeds)` fixes each grown seed into a freshly built host where it
grew, in the form `esper.grow.export` folds a fossilized seed into a plain model: an output
slot's site becomes `SeedResidual(site, seed)` (`y = h + seed(h)`), a parallel slot's
module (or span of children) becomes `SeedParallel(module, seed)` (`y = m(x) + seed(x)`;
a span's children run as one `nn.Sequential` at the first child's place, the others
become `nn.Identity`). The same modules as the grown model's are then present, and
trained, from step 0: the seeds' parameters are host parameters, their weights in the
host's state dict. (Not the merging fold rules: a width or LoRA seed stays its own module,
as it was when it grew.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from esper.errors import ConfigError
from esper.grow import SeedParallel, SeedResidual

FOLDED = {"output": SeedResidual, "parallel": SeedParallel}
"""Slot kind → the module that holds a site and its seed."""


@dataclass(frozen=True)
class GrownSeed:
    """One seed of a grown topology: where it grew, the slot's kind, its kernel."""

    slot_id: str
    """The slot's site: a module name, or a span `<container>.<first>:<last>`."""
    kind: str
    """"output" or "parallel" (`esper.grow.export.slot_kind`)."""
    kernel_id: str


def _span(host: nn.Module, slot_id: str) -> tuple[nn.Module, list[str]]:
    """The container and the names of its children a slot covers."""
    names = [n for n, _ in host.named_modules() if n]
    try:
        if ":" not in slot_id:
            container, _, child = slot_id.rpartition(".")
            parent = host.get_submodule(container) if container else host
            if child not in dict(parent.named_children()):
                raise AttributeError(slot_id)
            return parent, [child]
        head, _, last = slot_id.partition(":")
        container, _, first = head.rpartition(".")
        parent = host.get_submodule(container) if container else host
        children = [n for n, _ in parent.named_children()]
        i, j = children.index(first), children.index(last)
    except (AttributeError, ValueError):
        raise ConfigError(f"grown seed site {slot_id!r} is not a module or span of children of the "
                          f"host; modules: {', '.join(names)}") from None
    return parent, children[i:j + 1]


def attach_grown_seeds(host: nn.Module, seeds: Sequence[tuple[GrownSeed, nn.Module]]) -> None:
    """Fold each `(GrownSeed, seed module)` into `host` in place (see the module doc).

    Raises:
        ConfigError: a site that is not a module (or span) of the host, or an unknown kind.
    """
    for grown, seed in seeds:
        if grown.kind not in FOLDED:
            raise ConfigError(f"grown seed at {grown.slot_id!r} has slot kind {grown.kind!r}; "
                              f"kinds: {', '.join(FOLDED)}")
        parent, children = _span(host, grown.slot_id)
        modules = [getattr(parent, c) for c in children]
        site = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        setattr(parent, children[0], FOLDED[grown.kind](site, seed))
        for c in children[1:]:
            setattr(parent, c, nn.Identity())
