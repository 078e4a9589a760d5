"""Site patterns → module names, for any model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from esper.jobs.errors import JobConfigError
from esper.kasmina.sites import match_modules


def module_names(model: nn.Module) -> list[str]:
    """Names of every submodule (the root excluded), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_sites(model: nn.Module, patterns: Sequence[str | type[nn.Module]]) -> list[str]:
    """Module names matching the site patterns (fnmatch) or types, in the model's order.

    Raises:
        JobConfigError: a pattern or type matches no module (the message lists the names
            available), field `sites[i]`.
    """
    modules = [(name, m) for name, m in model.named_modules() if name]
    names = [name for name, _ in modules]
    chosen: set[str] = set()
    for i, pattern in enumerate(patterns):
        hits = match_modules(modules, pattern)
        what = (f"site type {pattern.__name__}" if isinstance(pattern, type)
                else f"site {pattern!r}")
        if not hits:
            raise JobConfigError(
                f"{what} matches no module of the host; available: {', '.join(names)}",
                field=f"sites[{i}]",
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]
