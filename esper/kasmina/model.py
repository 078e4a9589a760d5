"""`wrap` and `MorphogeneticModel`: a host model with seed slots at chosen sites.

The wrapper registers the host as `self.host` (the same object, no parameter copies) and
the slots under `self.seed_slots` (ModuleDict keyed by the slot id with "." replaced by
"-", since module names cannot contain dots). So `mm.state_dict()` holds the host's own
keys under the `host.` prefix, unchanged, next to `seed_slots.<key>.*`, and
`mm.host.state_dict()` is exactly what the unwrapped host would save.

Per-step use (single process or each DDP rank alike):

    loss.backward(); mm.clip_grad_norms(1.0, 1.0); opt.step(); mm.step()
    ... at each epoch boundary: mm.end_epoch(); snapshot = mm.health()

Strategic actions (germinate, prune, fossilize) belong at step boundaries; mechanical
transitions happen inside `step()` / `end_epoch()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from esper.errors import (
    ConfigError,
    FailedPreconditionError,
    IllegalTransitionError,
    InvalidArgumentError,
    NotFoundError,
)
from esper.kasmina.config import KasminaConfig
from esper.kasmina.events import KasminaEvent, SlotHealthData
from esper.kasmina.sites import SiteSpec, SlotKind, call, resolve_sites, signature, trace_sites
from esper.kasmina.slot import SeedSlot
from esper.kasmina.stages import LIVE_STAGES, SeedStage
from generated.esper.common.v1 import seed_pb2

_log = logging.getLogger(__name__)

EventSink = Callable[[KasminaEvent], None]
KernelResolver = Callable[[str], nn.Module]


def _slot_key(slot_id: str) -> str:
    return slot_id.replace(".", "-")


_PLAIN_ATTRS = frozenset({"_global_step", "_epoch", "_germinations", "_optimizer",
                          "_host_param_ids", "_event_sink", "_kernel_resolver", "_slots"})


class MorphogeneticModel(nn.Module):
    """A host model with seed slots. Build it with `esper.kasmina.wrap`."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Per-step counters bypass nn.Module's parameter/buffer/module checks.
        if name in _PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(
        self,
        host: nn.Module,
        *,
        sites: Sequence[SiteSpec] = (),
        parallel: Sequence[SiteSpec] = (),
        example_input: Any,
        config: KasminaConfig,
        event_sink: EventSink | None,
        kernel_resolver: KernelResolver | None,
    ) -> None:
        super().__init__()
        if not isinstance(config, KasminaConfig):
            raise ConfigError(f"config must be a KasminaConfig, got {type(config).__name__}")
        self.config = config
        self.host = host
        self._event_sink = event_sink
        self._kernel_resolver = kernel_resolver
        self._optimizer: torch.optim.Optimizer | None = None
        self._global_step = 0
        self._epoch = 0
        self._germinations = 0
        # global_step, epoch, germinations (germination order keeps optimizer groups aligned)
        self.register_buffer("counters", torch.zeros(3, dtype=torch.int64))
        plans = resolve_sites(host, sites, parallel)
        traced = trace_sites(host, plans, example_input)
        modules = dict(host.named_modules())
        self.seed_slots = nn.ModuleDict()
        for depth, plan in enumerate(sorted(plans, key=lambda p: traced[p.slot_id].order)):
            slot_id = plan.slot_id
            key = _slot_key(slot_id)
            if key in self.seed_slots:
                raise ConfigError(f"site names {slot_id!r} and another map to slot key {key!r}")
            t = traced[slot_id]
            reads = t.input if plan.kind is SlotKind.PARALLEL else t.output
            assert reads is not None
            slot = SeedSlot(
                slot_id=slot_id,
                site=[modules[n] for n in plan.modules],
                depth=depth,
                signature=signature(plan, t, config),
                probe=reads[: config.probe_rows],
                config=config,
                emit=self._emit,
                clock=self._clock,
                kind=plan.kind,
                out_shape=tuple(t.output[: config.probe_rows].shape),
            )
            slot._resolver = kernel_resolver
            self.seed_slots[key] = slot
        self._slots = {s.slot_id: s for s in self.seed_slots.values()}
        self._host_param_ids = {id(p) for p in host.parameters()}
        self._arm_for_next_step()
        self.register_load_state_dict_post_hook(MorphogeneticModel._after_load)

    # ---- plumbing ---------------------------------------------------------------------

    def _emit(self, event: KasminaEvent) -> None:
        _log.debug("kasmina event %s", event)
        if self._event_sink is not None:
            self._event_sink(event)

    def _clock(self) -> tuple[int, int]:
        return self._global_step, self._epoch

    def _slot(self, slot_id: str) -> SeedSlot:
        try:
            return self._slots[slot_id]
        except KeyError:
            raise NotFoundError(
                f"no seed slot {slot_id!r}; slots: {', '.join(self._slots) or '(none)'}",
                reason="SLOT_NOT_FOUND",
            ) from None

    def _arm_for_next_step(self) -> None:
        armed = (self._global_step + 1) % self.config.stats_interval == 0
        for slot in self._slots.values():
            slot.set_armed(armed)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.host(*args, **kwargs)

    # ---- views ------------------------------------------------------------------------

    @property
    def slots(self) -> dict[str, SeedSlot]:
        """Slots by slot id (the site's module name), in data-flow order."""
        return dict(self._slots)

    @property
    def global_step(self) -> int:
        return self._global_step

    @property
    def epoch(self) -> int:
        return self._epoch

    def site_signature(self, slot_id: str) -> seed_pb2.SiteSignature:
        return self._slot(slot_id).site_signature()

    def site_signatures(self) -> dict[str, seed_pb2.SiteSignature]:
        """slot id → `SiteSignature` of every slot, in data-flow order (what
        `esper.blueprints.fits` takes)."""
        return {slot_id: slot.site_signature() for slot_id, slot in self._slots.items()}

    def legal_actions(self, slot_id: str) -> set[str]:
        return self._slot(slot_id).legal_actions()

    def host_parameters(self) -> Iterator[nn.Parameter]:
        return self.host.parameters()

    def seed_parameters(self) -> Iterator[nn.Parameter]:
        for slot in self._slots.values():
            if slot.seed is not None:
                yield from slot.seed.parameters()

    # ---- strategic actions --------------------------------------------------------------

    def germinate(
        self,
        slot_id: str,
        seed_module: nn.Module,
        *,
        kernel_id: str,
        blueprint_id: str,
        reason: str = "",
    ) -> None:
        """Attach `seed_module` at `slot_id`: DORMANT → GERMINATED → TRAINING.

        The seed is moved to the site's device and dtype, checked on the activations
        recorded from `example_input` (same shape out, finite, and within
        `function_preserving_tol` of zero unless disabled), and its parameters join the
        attached optimizer in their own param group.

        Raises:
            IllegalTransitionError: the slot is not DORMANT.
            InvalidArgumentError: bad ids, a seed sharing host parameters, or a seed that
                fails the germination gate.
        """
        slot = self._slot(slot_id)
        if slot.current_stage is not SeedStage.DORMANT:
            raise IllegalTransitionError(
                f"slot {slot_id!r} is {slot.current_stage.name}; germinate needs DORMANT "
                f"(legal now: {sorted(slot.legal_actions()) or 'none'})"
            )
        if not isinstance(seed_module, nn.Module):
            raise InvalidArgumentError(
                f"seed_module must be an nn.Module, got {type(seed_module).__name__}",
                field="seed_module",
            )
        for name, value in (("kernel_id", kernel_id), ("blueprint_id", blueprint_id)):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{name}={value!r} must be a non-empty string",
                                           field=name)
        shared = [n for n, p in seed_module.named_parameters() if id(p) in self._host_param_ids]
        if shared:
            raise InvalidArgumentError(
                f"seed parameters {shared} are host parameters; a seed must own its parameters",
                field="seed_module",
            )
        slot.germinate(
            seed_module,
            kernel_id=kernel_id,
            blueprint_id=blueprint_id,
            index=self._germinations + 1,
            reason=reason,
        )
        self._germinations += 1
        self._join_optimizer(slot)
        slot.start_training()

    def prune(self, slot_id: str, reason: str) -> None:
        """Remove the seed: → PRUNED → EMBARGOED (→ RESETTING when the embargo is 0 epochs).

        Its parameters leave the optimizer (param group and state).
        """
        slot = self._slot(slot_id)
        if "prune" not in slot.legal_actions():
            raise IllegalTransitionError(
                f"slot {slot_id!r} is {slot.current_stage.name}; prune needs GERMINATED, "
                f"TRAINING, BLENDING or HOLDING"
            )
        self._leave_optimizer(slot)
        slot.prune(reason)

    def fossilize(self, slot_id: str, reason: str) -> None:
        """Make the seed a permanent part of the model: HOLDING → FOSSILIZED.

        Raises:
            IllegalTransitionError: the slot is not HOLDING.
            FailedPreconditionError: the fossilize gate failed (reason GATE_FAILED).
        """
        slot = self._slot(slot_id)
        if slot.current_stage is not SeedStage.HOLDING:
            raise IllegalTransitionError(
                f"slot {slot_id!r} is {slot.current_stage.name}; fossilize needs HOLDING"
            )
        slot.fossilize(reason)

    # ---- optimizer --------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Manage seed param groups in `optimizer`; live seeds join now in germination order.

        Seeds join as groups tagged `kasmina_slot=<slot id>`, in germination order, so an
        optimizer rebuilt after `load_state_dict` has its groups in the order of the saved
        optimizer and `optimizer.load_state_dict` restores the seeds' state.
        """
        seed_ids = {id(p) for p in self.seed_parameters()}
        foreign = [i for i, g in enumerate(optimizer.param_groups)
                   if "kasmina_slot" not in g and any(id(p) in seed_ids for p in g["params"])]
        if foreign:
            raise InvalidArgumentError(
                f"optimizer param group(s) {foreign} hold seed parameters; build the optimizer "
                "over mm.host.parameters() and let attach_optimizer add the seeds",
                field="optimizer",
            )
        self._optimizer = optimizer
        self._sync_optimizer()

    def _group_for(self, slot: SeedSlot) -> dict[str, Any] | None:
        assert self._optimizer is not None
        for group in self._optimizer.param_groups:
            if group.get("kasmina_slot") == slot.slot_id:
                return group
        return None

    def _join_optimizer(self, slot: SeedSlot) -> None:
        if self._optimizer is None or slot.seed is None:
            return
        params = [p for p in slot.seed.parameters() if p.requires_grad]
        if not params:
            return
        group: dict[str, Any] = {"params": params, "kasmina_slot": slot.slot_id}
        if self.config.seed_lr is not None:
            group["lr"] = self.config.seed_lr
        if self.config.seed_weight_decay is not None:
            group["weight_decay"] = self.config.seed_weight_decay
        self._optimizer.add_param_group(group)

    def _drop_group(self, group: dict[str, Any]) -> None:
        assert self._optimizer is not None
        groups = self._optimizer.param_groups
        # By identity: list.remove compares dicts by value, which compares their tensors.
        del groups[next(i for i, g in enumerate(groups) if g is group)]
        for p in group["params"]:
            self._optimizer.state.pop(p, None)

    def _leave_optimizer(self, slot: SeedSlot) -> None:
        if self._optimizer is None:
            return
        group = self._group_for(slot)
        if group is not None:
            self._drop_group(group)

    def _sync_optimizer(self) -> None:
        if self._optimizer is None:
            return
        live = {s.slot_id: s for s in self._slots.values() if s.seed is not None}
        for group in list(self._optimizer.param_groups):
            sid = group.get("kasmina_slot")
            if sid is None:
                continue
            slot = live.get(sid)
            current = {id(p) for p in slot.seed.parameters()} if slot is not None else set()
            if {id(p) for p in group["params"]} != current:
                self._drop_group(group)
        for slot in sorted(live.values(), key=lambda s: s.germination_index):
            if self._group_for(slot) is None:
                self._join_optimizer(slot)

    # ---- clocks -----------------------------------------------------------------------

    def step(self) -> None:
        """Call after each optimizer step: counters, alpha ramps, mechanical transitions."""
        self._global_step += 1
        sampled = self._global_step % self.config.stats_interval == 0
        for slot in self._slots.values():
            slot.on_step(sampled)
        self._arm_for_next_step()

    def end_epoch(self) -> list[SlotHealthData]:
        """Call at each epoch boundary; returns the health of the epoch just closed."""
        for slot in self._slots.values():
            slot.on_epoch()
        self._epoch += 1
        return self.health()

    # ---- gradients, health, contribution -----------------------------------------------

    def clip_grad_norms(self, host_max: float, seed_max: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip host and seed gradients separately; returns both total norms before clipping.

        Fossilized seeds count as seeds here (their parameters live in the slots, not the
        host). The norms are device tensors: reading them is the caller's choice.
        """
        for name, v in (("host_max", host_max), ("seed_max", seed_max)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise InvalidArgumentError(f"{name}={v!r} must be a number > 0", field=name)
        host = [p for p in self.host.parameters() if p.grad is not None]
        seeds = [p for p in self.seed_parameters() if p.grad is not None]
        zero = self.counters.new_zeros((), dtype=torch.float32)
        hn = torch.nn.utils.clip_grad_norm_(host, host_max, foreach=None) if host else zero
        sn = torch.nn.utils.clip_grad_norm_(seeds, seed_max, foreach=None) if seeds else zero
        return hn, sn

    def health(self) -> list[SlotHealthData]:
        """Health of every slot (reads the on-device accumulators once per slot)."""
        out = []
        for slot in self._slots.values():
            w = slot.window_for_health()
            seed_params = sum(p.numel() for p in slot.seed.parameters()) if slot.seed else 0
            contribution = slot.contribution_value
            out.append(
                SlotHealthData(
                    slot_id=slot.slot_id,
                    stage=slot.current_stage,
                    alpha=slot.alpha,
                    site=slot.site_signature(),
                    blueprint_id=slot.blueprint_id,
                    kernel_id=slot.kernel_id,
                    host_grad_norm=w["host_grad_norm"],
                    seed_grad_norm=w["seed_grad_norm"],
                    activation_mean=w["activation_mean"],
                    activation_std=w["activation_std"],
                    contribution=contribution or 0.0,
                    contribution_measured=contribution is not None,
                    steps_in_stage=slot.steps_in_stage,
                    epochs_in_stage=slot.epochs_in_stage,
                    seed_parameters=seed_params,
                    host_parameters=sum(p.numel() for p in slot.site_parameters()),
                    embargo_epochs_left=slot.embargo_epochs_left,
                    finite=bool(w["finite"]),
                    depth=slot.depth,
                )
            )
        return out

    @torch.no_grad()
    def measure_contribution(
        self, x: Any, y: Any, loss_fn: Callable[[Any, Any], torch.Tensor]
    ) -> dict[str, float]:
        """Counterfactual contribution of each slot whose seed is blended in.

        For every slot in BLENDING, HOLDING or FOSSILIZED: `loss_fn(model(x) with that
        slot's alpha forced to 0, y) - loss_fn(model(x), y)`, in eval mode without autograd
        (positive: the seed helps). TRAINING seeds do not change the forward, so they are
        not listed. Values are stored for `health()` and the fossilize gate.
        """
        targets = [s for s in self._slots.values()
                   if s.current_stage in (SeedStage.BLENDING, SeedStage.HOLDING,
                                          SeedStage.FOSSILIZED)]
        if not targets:
            return {}
        # Per module, not `self.train(was_training)`: a caller may keep parts of the host
        # in eval mode while training (frozen BatchNorm), and must find them so again.
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            base = float(loss_fn(call(self, x), y))
            result: dict[str, float] = {}
            for slot in targets:
                slot._force_zero = True
                try:
                    ablated = float(loss_fn(call(self, x), y))
                finally:
                    slot._force_zero = False
                result[slot.slot_id] = ablated - base
                slot.set_contribution(ablated - base)
        finally:
            for m, mode in modes:
                m.training = mode
        return result

    # ---- persistence ------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.counters.copy_(torch.tensor((self._global_step, self._epoch, self._germinations),
                                         dtype=torch.int64))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "counters" in state_dict:
            c = [int(v) for v in state_dict[prefix + "counters"].tolist()]
            self._global_step, self._epoch, self._germinations = c

    @staticmethod
    def _after_load(module: nn.Module, _incompatible: Any) -> None:
        assert isinstance(module, MorphogeneticModel)
        module._host_param_ids = {id(p) for p in module.host.parameters()}
        module._arm_for_next_step()
        module._sync_optimizer()

    def remove_hooks(self, *, drop_fossilized: bool = False) -> None:
        """Detach every slot from the host (the host runs as if never wrapped).

        A fossilized seed is part of the model; removing its hook would drop it silently.
        To keep it, fold it into a plain module (`esper.grow.fold` / `esper.grow.export`).

        Raises:
            FailedPreconditionError: a slot is FOSSILIZED and `drop_fossilized` is False.
        """
        fossils = [s.slot_id for s in self._slots.values() if s.current_stage is SeedStage.FOSSILIZED]
        if fossils and not drop_fossilized:
            raise FailedPreconditionError(
                f"slot(s) {fossils} hold fossilized seeds, which remove_hooks() would drop; "
                "use esper.grow.fold(mm) (or esper.grow.export) for a plain model with them "
                "folded in, or remove_hooks(drop_fossilized=True) to run the bare host",
                reason="FOSSILIZED_SEEDS",
            )
        for slot in self._slots.values():
            slot.remove_hook()

    def extra_repr(self) -> str:
        live = sum(1 for s in self._slots.values() if s.current_stage in LIVE_STAGES)
        return f"slots={len(self._slots)}, live={live}"


def wrap(
    model: nn.Module,
    *,
    sites: Sequence[SiteSpec] = (),
    parallel: Sequence[SiteSpec] = (),
    example_input: Any,
    config: KasminaConfig | None = None,
    event_sink: EventSink | None = None,
    kernel_resolver: KernelResolver | None = None,
) -> MorphogeneticModel:
    """Wrap `model` with a seed slot at every module matching `sites` and `parallel`.

    Args:
        model: the host; it is used in place (no copy), `wrap(m, ...).host is m`.
        sites: output slots (`y = h + alpha * s(h)`): fnmatch patterns over module names
            and/or nn.Module types; `Site(match, kind="parallel")` entries ask for parallel
            slots here too.
        parallel: parallel slots (`y = m(x) + alpha * s(x)`, the seed reads the module's
            input): patterns, types, or spans of a container's children written
            "<container>.<first>:<last>" (inclusive; "<first>:<last>" for the model's own
            children), e.g. `parallel=[nn.Linear, "blocks.*.mlp", "fc1:fc2"]`.
        example_input: a tensor (or tuple of positional args, or dict of kwargs) run once
            in eval mode without autograd to order the sites by data flow and record each
            site's `SiteSignature` and germination probe.
        config: defaults to `KasminaConfig()`.
        event_sink: receives every `KasminaEvent` (transitions and gate evaluations).
        kernel_resolver: `kernel_id -> nn.Module`, used by `load_state_dict` to
            re-materialise germinated seeds before their weights are loaded.

    Raises:
        ConfigError: no site asked for, a site matches nothing (the message lists the
            available modules), does not run on `example_input`, or has an unsupported
            output; a parallel site whose module is not called with exactly one
            floating-point tensor, or a span whose children do not form a chain; one
            module asked for as both kinds, or two slots changing one module's output.
    """
    return MorphogeneticModel(
        model,
        sites=sites,
        parallel=parallel,
        example_input=example_input,
        config=config or KasminaConfig(),
        event_sink=event_sink,
        kernel_resolver=kernel_resolver,
    )
