"""Keep torch LR schedulers right when seed param groups join or leave the optimizer.

A torch scheduler keeps state per param group: `initial_lr` (and OneCycle's `max_lr`,
`min_lr`, momentum bounds) in the group itself, and lists indexed by group in the
scheduler (`base_lrs`, `_last_lr`, LambdaLR's `lr_lambdas`, CyclicLR's `max_lrs`,
ReduceLROnPlateau's `min_lrs`, ...). Kasmina appends a group when a seed germinates and
deletes it when the seed is pruned; without the matching entries LambdaLR fails with
`zip() argument 2 is shorter` and OneCycleLR with `KeyError: 'initial_lr'`.

The rule: a seed group follows the schedule of a *template* group (a host group, index 0
by default) scaled by `ratio` = seed base lr / template base lr (1 when
`KasminaConfig.seed_lr` is None: the seed's lr is the host's, step for step). It is the lr
a group with that base would have had, had it been in the optimizer from step 0. Every
lr-valued entry is scaled by `ratio` (base_lrs, initial_lr, max_lr(s), min_lr(s), the
current lr); every other entry is copied from the template (lambdas, momentum bounds,
the cycled momentum). Composite schedulers (SequentialLR, ChainedScheduler) recurse into
their children. A removed group's entries are deleted from every list.

Exact for every class in `torch.optim.lr_scheduler`, with one approximation: under
`CosineAnnealingLR`/`CosineAnnealingWarmRestarts` with `eta_min != 0` *nested in a
composite* and `ratio != 1`, the seed starts from `ratio x` the template's lr instead of
its own closed form (at top level the closed form is used).

Scheduler classes from elsewhere (Lightning, transformers, your own) work when their
per-group state is in the attribute names above; if one keeps other per-group lists,
`register_scheduler` names them, and an unnamed list that looks per-group is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

from esper.errors import ConfigError, FailedPreconditionError

LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
"""Per-group scheduler lists holding learning rates: scaled by the ratio for a seed group."""
COPY_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")
"""Per-group scheduler lists holding anything else: the template's entry is copied."""
LR_KEYS = ("initial_lr", "max_lr", "min_lr")
"""Param-group keys schedulers add that hold learning rates (OneCycleLR's among them)."""
COPY_KEYS = ("max_momentum", "base_momentum")
"""Param-group keys schedulers add that are copied from the template group."""

_extra_lr_lists: dict[type, tuple[str, ...]] = {}
_extra_copy_lists: dict[type, tuple[str, ...]] = {}
# Per-group-looking lists of torch's own classes that are not per group.
_NOT_PER_GROUP = frozenset({"_milestones", "_schedule_phases", "_schedulers", "milestones"})


def register_scheduler(cls: type, *, lr_lists: Sequence[str] = (), copy_lists: Sequence[str] = ()
                       ) -> None:
    """Declare the per-group lists of a scheduler class beyond the torch names above.

    Args:
        cls: the scheduler class (subclasses inherit the declaration).
        lr_lists: attributes holding one learning rate per param group.
        copy_lists: attributes holding one other value per param group.
    """
    _extra_lr_lists[cls] = tuple(lr_lists)
    _extra_copy_lists[cls] = tuple(copy_lists)


def _declared(s: Any, table: dict[type, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(a for cls, attrs in table.items() if isinstance(s, cls) for a in attrs)


def _lists(s: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return LR_LISTS + _declared(s, _extra_lr_lists), COPY_LISTS + _declared(s, _extra_copy_lists)


def flatten(schedulers: Iterable[Any]) -> list[Any]:
    """Every scheduler object in `schedulers` and their children, each once, parents first."""
    out: list[Any] = []
    seen: set[int] = set()

    def visit(s: Any) -> None:
        if id(s) in seen:
            return
        seen.add(id(s))
        out.append(s)
        for child in getattr(s, "_schedulers", ()) or ():
            visit(child)

    for s in schedulers:
        visit(s)
    return out


def _scale(value: Any, ratio: float) -> Any:
    if ratio == 1.0:
        return value.clone() if isinstance(value, torch.Tensor) else value
    return value * ratio


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _set_lr(group: dict[str, Any], value: Any) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(value))
    else:
        group["lr"] = float(value) if isinstance(value, torch.Tensor) else value


class SchedulerSync:
    """Mirrors the optimizer's param groups into its schedulers' per-group state.

    Call `sync()` after anything that may have added or removed param groups (the
    grower does, after each germinate, prune and load). Groups are tracked by identity;
    new groups must be appended (Kasmina appends) and kept groups keep their order.

    Args:
        optimizer: the optimizer the schedulers drive.
        schedulers: the user's schedulers (composites are walked into).
        template: index of the host param group seed groups follow.
        seed_lr: the seeds' base learning rate (None: the template's, ratio 1).

    Raises:
        ConfigError: a scheduler of another optimizer, per-group state that does not
            match the optimizer's groups, or a template index out of range.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any], *,
                 template: int = 0, seed_lr: float | None = None) -> None:
        self.optimizer = optimizer
        self.roots = list(schedulers)
        self.schedulers = flatten(self.roots)
        groups = optimizer.param_groups
        if not 0 <= template < len(groups):
            raise ConfigError(
                f"template param group {template} does not exist; the optimizer has "
                f"{len(groups)} group(s) (0..{len(groups) - 1})"
            )
        self._template = groups[template]
        if "kasmina_slot" in self._template:
            raise ConfigError(
                f"template param group {template} is the seed group of slot "
                f"{self._template['kasmina_slot']!r}; choose a host group"
            )
        base = self._template.get("initial_lr", self._template["lr"])
        self.ratio = 1.0 if seed_lr is None else float(seed_lr) / float(base)
        for s in self.schedulers:
            owner = getattr(s, "optimizer", optimizer)
            if owner is not optimizer:
                raise ConfigError(
                    f"scheduler {type(s).__name__} drives another optimizer "
                    f"({type(owner).__name__} at {id(owner):#x}); pass the schedulers of the "
                    "optimizer the grower manages"
                )
            self._check_lengths(s, len(groups), when="at construction")
        self._known: list[dict[str, Any]] = list(groups)
        # `optimizer.load_state_dict` replaces every group dict by a new one at the same
        # position; follow them there.
        self._hook = optimizer.register_load_state_dict_post_hook(self._after_optimizer_load)

    def _after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        t = next(i for i, g in enumerate(self._known) if g is self._template)
        self._known = list(optimizer.param_groups)
        self._template = self._known[t]

    def close(self) -> None:
        """Stop following the optimizer (the grower manages another one now)."""
        self._hook.remove()

    @property
    def template_index(self) -> int:
        return next(i for i, g in enumerate(self.optimizer.param_groups) if g is self._template)

    def _check_lengths(self, s: Any, n: int, *, when: str) -> None:
        lr_lists, copy_lists = _lists(s)
        for name in lr_lists + copy_lists:
            value = getattr(s, name, None)
            if isinstance(value, list) and len(value) != n:
                raise ConfigError(
                    f"{type(s).__name__}.{name} has {len(value)} entries but the optimizer has "
                    f"{n} param group(s) {when}; build the scheduler after the optimizer's "
                    "groups are final, or let the grower add seed groups"
                )

    def _unknown_per_group(self, s: Any, n: int) -> list[str]:
        if type(s).__module__ == lrs.__name__:
            return []
        lr_lists, copy_lists = _lists(s)
        known = set(lr_lists) | set(copy_lists) | _NOT_PER_GROUP
        return [k for k, v in vars(s).items()
                if isinstance(v, list) and len(v) == n and k not in known and n > 1]

    def sync(self) -> bool:
        """Bring the schedulers up to date with the optimizer's groups; True if anything changed.

        Raises:
            FailedPreconditionError: groups were reordered, the template group was
                removed, or a scheduler holds a per-group list this module cannot extend.
        """
        groups = self.optimizer.param_groups
        known = self._known
        if len(groups) == len(known) and all(a is b for a, b in zip(groups, known, strict=True)):
            return False
        current = {id(g) for g in groups}
        removed = [i for i, g in enumerate(known) if id(g) not in current]
        kept = [g for g in known if id(g) in current]
        if any(a is not b for a, b in zip(kept, groups, strict=False)) or len(groups) < len(kept):
            raise FailedPreconditionError(
                "the optimizer's param groups were reordered; esper.grow follows groups by "
                "position in the schedulers, so only appending (germinate) and deleting (prune) "
                "are supported"
            )
        if not any(g is self._template for g in kept):
            raise FailedPreconditionError(
                "the template param group of the schedulers was removed from the optimizer")
        for s in self.schedulers:
            unknown = self._unknown_per_group(s, len(known))
            if unknown:
                raise FailedPreconditionError(
                    f"scheduler {type(s).__name__} keeps list(s) {unknown} with one entry per "
                    "param group that esper.grow does not know; declare them with "
                    "esper.grow.schedulers.register_scheduler(cls, lr_lists=..., copy_lists=...)"
                )
        # A composite's `_last_lr` can be its active child's list object itself, so each
        # list is edited once per group however many schedulers hold it.
        for i in reversed(removed):
            touched: set[int] = set()
            for s in self.schedulers:
                self._remove(s, i, touched)
        t = next(i for i, g in enumerate(kept) if g is self._template)
        for k in range(len(kept), len(groups)):
            self._add_group_keys(groups[k])
            touched = set()
            for s in self.schedulers:
                self._add(s, t, k, touched)
            self._closed_form_override(groups[k], k)
        for s in self.schedulers:
            self._check_lengths(s, len(groups), when="after a seed joined or left")
        self._known = list(groups)
        return True

    # ---- one group ---------------------------------------------------------------------

    def _add_group_keys(self, group: dict[str, Any]) -> None:
        tg = self._template
        for key in LR_KEYS:
            if key in tg:
                group[key] = _scale(tg[key], self.ratio)
        for key in COPY_KEYS:
            if key in tg:
                group[key] = _copy(tg[key])
        if "max_momentum" in tg:
            # OneCycleLR/CyclicLR with cycle_momentum: the momentum is on the schedule too.
            if "betas" in tg and "betas" in group:
                group["betas"] = (tg["betas"][0], *group["betas"][1:])
            elif "momentum" in tg and "momentum" in group:
                group["momentum"] = _copy(tg["momentum"])
        if self.schedulers:
            _set_lr(group, _scale(tg["lr"], self.ratio))

    def _add(self, s: Any, t: int, k: int, touched: set[int]) -> None:
        lr_lists, copy_lists = _lists(s)
        for name in lr_lists + copy_lists:
            value = getattr(s, name, None)
            if isinstance(value, list) and id(value) not in touched:
                touched.add(id(value))
                entry = _scale(value[t], self.ratio) if name in lr_lists else _copy(value[t])
                value.insert(k, entry)

    @staticmethod
    def _remove(s: Any, i: int, touched: set[int]) -> None:
        lr_lists, copy_lists = _lists(s)
        for name in lr_lists + copy_lists:
            value = getattr(s, name, None)
            if isinstance(value, list) and id(value) not in touched:
                touched.add(id(value))
                del value[i]

    def _closed_form_override(self, group: dict[str, Any], k: int) -> None:
        # Cosine with a floor is affine, not linear, in the base lr: scaling the template's
        # current lr would start the seed off its own curve.
        if self.ratio == 1.0 or len(self.roots) != 1:
            return
        s = self.roots[0]
        if isinstance(s, lrs.CosineAnnealingLR) and s.eta_min:
            phase = s.last_epoch / s.T_max
        elif isinstance(s, lrs.CosineAnnealingWarmRestarts) and s.eta_min:
            phase = s.T_cur / s.T_i
        else:
            return
        base = float(s.base_lrs[k])
        lr = s.eta_min + (base - s.eta_min) * (1 + math.cos(math.pi * phase)) / 2
        _set_lr(group, lr)
        if isinstance(getattr(s, "_last_lr", None), list):
            s._last_lr[k] = lr
