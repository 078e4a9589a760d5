"""`Grower`: growth in the user's own training loop.

    grower = Grower(model, sites=["blocks.*"], example_input=xb, optimizer=opt,
                    scheduler=sched, loss_fn=loss_fn, held_out=(x_val, y_val),
                    controller=heuristic_controller(), kernels=BuiltinKernels())
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()
            grower.step()
        report = grower.end_epoch(train_loss=..., val_loss=..., val_accuracy=...)

`model` keeps working as it is: Kasmina's slots hook into its modules, so `model(x)` runs
the seeds. At each `end_epoch` the grower does what Tolaria's trainer does at a boundary:
closes the epoch in Kasmina, measures each blended seed's counterfactual contribution on
the held-out batch, builds the `HealthSnapshot` (slots with their own history, model
graph, the loss/accuracy history the caller reports, budget), asks the controller with
the kernels the source offers, and — when the controller wants to germinate — probes the
offered kernels (`esper.grow.probe`) and asks again with what they measured; then applies
each decision through Kasmina (rejecting, with a reason, what cannot be applied) and
emits events. Seeds join the optimizer (and every scheduler) at germination and leave at
prune.

The grower counts the FLOPs of its own boundary work (the contribution forwards and the
probes, `torch.utils.flop_counter`) as *decision FLOPs*: `EpochReport.decision_flops`,
`GrowthHistory.decision_flops` and `EpochMetrics.decision_flops`, next to the training
FLOPs a caller reports.

Each slot's record at every controlled boundary (stage, contribution) is kept in
`GrowthHistory.slot_records`, which is in the grower's `state_dict`, and sent in every
snapshot (`HealthSnapshot.slot_records`, `HealthSnapshot.slot_history`): a controller reads the
run's history from the run, so any Tamiyo replica answers a boundary the same way, and a
resumed run carries it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints import fits, site_key
from esper.errors import ConfigError, EsperError, FailedPreconditionError, NotFoundError
from esper.grow.config import GrowthConfig
from esper.grow.events import EventSink, EventStream
from esper.grow.probe import ProbeSettings, probe_slot, rows, split_rows
from esper.grow.protocols import Controller, KernelSource, Stateful
from esper.grow.schedulers import SchedulerSync
from esper.grow.snapshot import (
    UNBOUNDED_PARAMETERS,
    Budget,
    attach_history,
    build_snapshot,
    count,
    execution_order,
    model_graph,
    offered_kernels,
    slot_records,
)
from esper.kasmina import KasminaConfig, KasminaEvent, MorphogeneticModel, SeedStage, wrap
from esper.kasmina.stages import LIVE_STAGES, PRUNABLE_STAGES
from generated.esper.common.v1 import blueprint_pb2, decision_pb2, health_pb2
from generated.esper.oona.v1 import events_pb2

_log = logging.getLogger(__name__)

STATE_FORMAT = 1
_Kind = decision_pb2.DecisionKind


@dataclass(kw_only=True)
class GrowthHistory:
    """Per-boundary records (index i = the boundary after epoch i + 1)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    parameters: list[int] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    stages: list[dict[str, str]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """Every non-WAIT decision, applied or not: epoch, kind, slot, kernel_id, reason, rejected."""
    train_flops: list[float] = field(default_factory=list)
    """The training FLOPs the caller reported at each boundary (`end_epoch(train_flops=)`)."""
    decision_flops: list[float] = field(default_factory=list)
    """FLOPs of the grower's own work at each boundary: contribution forwards and probes."""
    slot_records: list[dict[str, Any]] = field(default_factory=list)
    """Per controlled boundary, `{"epoch": e, "slots": {slot_id: [stage, measured,
    contribution, kernel_id]}}`: what every snapshot's `HealthSnapshot.slot_records` is built from."""
    probes: list[dict[str, Any]] = field(default_factory=list)
    """Per boundary that probed, `{"epoch": e, "slots": {slot_id: [[kernel_id, gain,
    gain_stderr, steps, flops], ...]}}`."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GrowthHistory:
        return cls(**{k: list(v) for k, v in d.items()})


@dataclass(kw_only=True)
class EpochReport:
    """What happened at one boundary."""

    epoch: int
    """Epochs completed (the snapshot's epoch)."""
    snapshot: health_pb2.HealthSnapshot | None
    """What the controller saw; None when no controller was asked."""
    decisions: list[decision_pb2.Decision]
    """The controller's decisions, as returned."""
    rejected: dict[int, str]
    """Index into `decisions` → why it was not applied."""
    degraded: list[str]
    """Degradations recorded at this boundary ("component kind: detail")."""
    stages: dict[str, str]
    alphas: dict[str, float]
    parameters: int
    control_ms: float
    """Wall time of snapshot → decide → apply, contribution measurement included."""
    contribution_ms: float = 0.0
    """Of `control_ms`, the forwards on the held-out batch (one per blended seed, plus one)."""
    probe_ms: float = 0.0
    """Of `control_ms`, the cold-start probes (0 when none ran)."""
    decision_flops: float = 0.0
    """FLOPs of the grower's own work at this boundary (contribution forwards, probes)."""

    @property
    def applied(self) -> list[decision_pb2.Decision]:
        """The decisions that took effect (WAITs excluded)."""
        return [d for i, d in enumerate(self.decisions)
                if d.kind != _Kind.DECISION_KIND_WAIT and i not in self.rejected]

    def __str__(self) -> str:
        acts = ", ".join(f"{_Kind.Name(d.kind).removeprefix('DECISION_KIND_').lower()} {d.slot_id}"
                         for d in self.applied) or "no change"
        live = {s: st for s, st in self.stages.items() if st != "DORMANT"}
        return f"epoch {self.epoch}: {acts}; {self.parameters} parameters; seeds {live or 'none'}"


def _listed_blueprints(kernels: Any) -> list[blueprint_pb2.Blueprint] | None:
    """The blueprints a kernel source offers, when it lists them (`BuiltinKernels` does)."""
    listed = getattr(kernels, "blueprints", None)
    if isinstance(listed, Mapping):
        listed = list(listed.values())
    # Non-empty: an empty tuple is also what a remote source's "no names given: the whole
    # catalog" looks like (`UrzaKernels.blueprints`), which lists nothing it could check.
    if (isinstance(listed, list | tuple) and listed
            and all(isinstance(b, blueprint_pb2.Blueprint) for b in listed)):
        return list(listed)
    return None


def _finite_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name}={value!r} is not finite; report the epoch's real loss or None")
    return v


class Grower:
    """Grows `model` in the caller's training loop.

    Args:
        model: the host, any `nn.Module`; used in place (no copy).
        sites: output slots (`y = h + alpha * s(h)`): module-name patterns (fnmatch)
            and/or module types where seeds may grow after a module.
        parallel: parallel slots (`y = m(x) + alpha * s(x)`: the seed reads the module's
            input, e.g. to widen a Linear or add a LoRA): patterns, types, or spans of
            children "<container>.<first>:<last>" (see `esper.kasmina.wrap`).
        example_input: one batch of inputs (tensor, tuple of args, dict of kwargs); run
            once to record each site's signature.
        optimizer: the optimizer over the host's parameters; seed groups are added to it.
        scheduler: None, one LR scheduler of `optimizer`, or several (composites are
            fine); their per-group state follows seed groups in and out.
        loss_fn: `(model output, target) -> scalar`; measures contribution on `held_out`.
        held_out: a fixed `(inputs, targets)` batch the training never sees; each blended
            seed's counterfactual contribution is measured on it at every boundary.
        probe_batch: a fixed `(inputs, targets)` batch of training rows the cold-start
            probes fit on (their gain is measured on `held_out`); None: they fit on the
            first `GrowthConfig.probe_fit_fraction` of `held_out` and measure on the rest.
        controller: decides growth (`esper.grow.heuristic_controller()`,
            `esper.tamiyo.client.TamiyoController(...)`, ...); None: the slots exist but
            nothing grows (a static baseline through the same code).
        kernels: where seed modules come from (`esper.grow.BuiltinKernels()`,
            `esper.urza.source.UrzaKernels(...)`).
        config: the growth budget (`GrowthConfig`).
        kasmina: seed-slot behaviour (incubation, blending, gates, `seed_lr`).
        event_sink: receives every `esper.oona.v1.EventEnvelope`.
        run_id: names the run in events and snapshots (default: a fresh UUID; a loaded
            checkpoint brings its own).
        event_source: `EventEnvelope.source` of the grower's own events.

    Raises:
        ConfigError: a bad argument (the message names it and what is allowed), or a
            controller with kernels that list their blueprints (`BuiltinKernels`) none of
            which fits any slot (the message lists both): that run would never grow. A
            source that cannot list them up front (a remote catalog) is checked at each
            boundary instead: when no kernel fits any open slot, a `DegradationEvent`
            (kind "no_kernels_fit") says so.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sites: Sequence[Any] = (),
        parallel: Sequence[Any] = (),
        example_input: Any,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        held_out: tuple[Any, Any] | None = None,
        probe_batch: tuple[Any, Any] | None = None,
        controller: Controller | None = None,
        kernels: KernelSource | None = None,
        scheduler: Any = None,
        config: GrowthConfig | None = None,
        kasmina: KasminaConfig | None = None,
        event_sink: EventSink | None = None,
        run_id: str | None = None,
        event_source: str = "grow",
    ) -> None:
        if isinstance(model, MorphogeneticModel) or not isinstance(model, nn.Module):
            raise ConfigError(
                f"model must be the host nn.Module (not yet wrapped), got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if controller is not None and kernels is None:
            raise ConfigError("a controller needs kernels=: pass esper.grow.BuiltinKernels() or "
                              "another KernelSource")
        if controller is not None and (held_out is None or loss_fn is None):
            raise ConfigError(
                "a controller needs loss_fn= and held_out=(inputs, targets): it reads each seed's "
                "counterfactual contribution, measured on that fixed held-out batch")
        for name, batch in (("held_out", held_out), ("probe_batch", probe_batch)):
            if batch is not None and (not isinstance(batch, tuple) or len(batch) != 2):
                raise ConfigError(f"{name} must be a tuple (inputs, targets), got {type(batch).__name__}")
        if config is not None and not isinstance(config, GrowthConfig):
            raise ConfigError(f"config must be a GrowthConfig, got {type(config).__name__}")
        self.config = config or GrowthConfig()
        self.controller = controller
        self.kernels = kernels
        self.loss_fn = loss_fn
        self.held_out = held_out
        self.probe_batch = probe_batch
        self.events = EventStream(run_id or str(uuid.uuid4()), event_sink)
        self.event_source = event_source
        self.history = GrowthHistory()
        self.seeds_germinated = 0
        self.degraded: set[str] = set()
        self._degradations: list[str] = []
        self._contribution_ms = 0.0
        self._probe_ms = 0.0
        self._decision_flops = 0.0
        self._steps_at_boundary = 0
        self._optimizer_steps = 0
        self._epoch_t0 = time.perf_counter()
        self.model: MorphogeneticModel = wrap(
            model, sites=sites, parallel=parallel, example_input=example_input,
            config=kasmina or KasminaConfig(),
            event_sink=self._on_kasmina_event, kernel_resolver=self._resolve,
        )
        self.host_parameters = count(model.parameters())
        self._order = execution_order(
            model, example_input, {sid: s.site_module for sid, s in self.model.slots.items()})
        if controller is not None:
            listed = _listed_blueprints(kernels)
            if listed is not None:
                fits(listed, self.model.site_signatures())
        self.optimizer = optimizer
        self._hook = None
        self.schedulers: list[Any] = []
        self._sync: SchedulerSync | None = None
        self.attach_optimizer(optimizer, scheduler)

    # ---- wiring ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.events.run_id

    @property
    def epoch(self) -> int:
        """Boundaries passed (`end_epoch` calls)."""
        return self.model.epoch

    @property
    def global_step(self) -> int:
        return self.model.global_step

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """Manage `optimizer` (and its schedulers) from now on; live seeds join it now.

        Use it when the optimizer is rebuilt (or built late, as Lightning does). Build the
        optimizer over the host's parameters only.

        Raises:
            ConfigError: a scheduler of another optimizer or with mismatched state.
            InvalidArgumentError: the optimizer already holds seed parameters.
        """
        schedulers = [] if scheduler is None else (
            list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler])
        groups = len(optimizer.param_groups)
        if self.config.template_group >= groups:
            raise ConfigError(
                f"GrowthConfig.template_group={self.config.template_group} but the optimizer has "
                f"{groups} param group(s)")
        for s in schedulers:
            if not isinstance(s, torch.optim.lr_scheduler.LRScheduler):
                raise ConfigError(
                    f"scheduler {s!r} is not a torch.optim.lr_scheduler scheduler "
                    "(LRScheduler or ReduceLROnPlateau)")
        sync = SchedulerSync(optimizer, schedulers, template=self.config.template_group,
                             seed_lr=self.model.config.seed_lr) if schedulers else None
        if self._hook is not None:
            self._hook.remove()
        if self._sync is not None:
            self._sync.close()
        self.model.attach_optimizer(optimizer)
        self.optimizer, self.schedulers, self._sync = optimizer, schedulers, sync
        self._hook = optimizer.register_step_post_hook(self._count_optimizer_step)
        self._sync_schedulers()

    def _count_optimizer_step(self, *_: Any) -> None:
        self._optimizer_steps += 1

    def _sync_schedulers(self) -> None:
        if self._sync is not None:
            self._sync.sync()

    def _resolve(self, kernel_id: str) -> nn.Module:
        if self.kernels is None:
            raise FailedPreconditionError(
                f"the checkpoint holds kernel {kernel_id!r}; pass kernels= to the Grower to rebuild it")
        return self._load_kernel(kernel_id, None)

    def _load_kernel(self, kernel_id: str, site: Any) -> nn.Module:
        assert self.kernels is not None
        # A kernel source may draw random numbers; the caller's streams (data order,
        # dropout) must not depend on whether or when the model grew.
        with torch.random.fork_rng(devices=[]):
            return self.kernels.load(kernel_id, site)

    # ---- the loop ----------------------------------------------------------------------

    def step(self) -> None:
        """Call after every `optimizer.step()`: alpha ramps and mechanical transitions."""
        self.model.step()

    def end_epoch(
        self,
        *,
        train_loss: float | None = None,
        val_loss: float | None = None,
        val_accuracy: float | None = None,
        held_out: tuple[Any, Any] | None = None,
        control: bool = True,
        learning_rate: float | None = None,
        train_flops: float = 0.0,
        stepped: bool = True,
    ) -> EpochReport:
        """Close an epoch: Kasmina's boundary, then snapshot → decide → apply, then events.

        Args:
            train_loss, val_loss, val_accuracy: this epoch's figures (None: not reported;
                the heuristic needs `val_loss` to see a plateau).
            held_out: a batch for this boundary's contribution (default: the constructor's).
            control: False skips the controller at this boundary. It is skipped anyway
                (nothing measured, no snapshot) when nothing is actionable: no seed in
                flight and no germination the budget and the slots still allow.
            learning_rate: reported in `EpochMetrics` (default: the template group's).
            train_flops: reported in `EpochMetrics` (a caller that counts FLOPs).
            stepped: False when the caller knows the epoch took no optimizer step (a
                governor rolled it back at its first step): the two step checks are skipped.

        Raises:
            FailedPreconditionError: `step()` was not called since the last boundary, the
                managed optimizer never stepped, or a seed's parameters are in no
                param group of the managed optimizer.
            ConfigError: a reported loss or accuracy that is not finite.
        """
        self._check_use(stepped)
        self.model.end_epoch()
        h = self.history
        for name, value, series in (("train_loss", train_loss, h.train_loss),
                                    ("val_loss", val_loss, h.val_loss),
                                    ("val_accuracy", val_accuracy, h.val_accuracy)):
            v = _finite_or_none(name, value)
            if v is not None:
                series.append(v)
        t0 = time.perf_counter()
        self._contribution_ms = self._probe_ms = self._decision_flops = 0.0
        snapshot, decisions, rejected = None, [], {}
        last = self.config.total_epochs is not None and self.epoch >= self.config.total_epochs
        if control and self.controller is not None and not last and self._actionable():
            snapshot, decisions, rejected = self._control(held_out or self.held_out)
        control_ms = (time.perf_counter() - t0) * 1e3
        report = self._close(decisions, rejected, snapshot, control_ms, learning_rate, train_flops)
        self._steps_at_boundary = self.global_step
        self._optimizer_steps = 0
        self._degradations.clear()
        return report

    def _actionable(self) -> bool:
        """Whether a controller could do anything now: a seed still in flight (it may be
        fossilized or pruned), or a germination the budget and the slots still allow.
        When neither holds (every seed fossilized, the budget spent) the boundary asks no
        controller and measures nothing: no decision could use the answer."""
        stages = [s.current_stage for s in self.model.slots.values()]
        if any(st in PRUNABLE_STAGES for st in stages):
            return True
        return (self.seeds_germinated < self.config.max_seeds and self.parameters_left() > 0
                and any(st is not SeedStage.FOSSILIZED for st in stages))

    def _check_use(self, stepped: bool = True) -> None:
        steps = self.global_step - self._steps_at_boundary
        if stepped and steps == 0:
            raise FailedPreconditionError(
                f"end_epoch() at epoch {self.epoch + 1}: grower.step() was not called since the "
                f"last boundary (the optimizer stepped {self._optimizer_steps} times); call "
                "grower.step() after every optimizer.step(), or seeds never advance",
                reason="NO_STEP")
        if stepped and self._optimizer_steps == 0:
            raise FailedPreconditionError(
                f"end_epoch() at epoch {self.epoch + 1}: grower.step() ran {steps} times but the "
                "optimizer the grower manages never stepped; if you built a new optimizer, "
                "pass it to grower.attach_optimizer(optimizer, scheduler)",
                reason="OPTIMIZER_NOT_STEPPED")
        in_groups = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [sid for sid, s in self.model.slots.items() if s.seed is not None
                   and any(p.requires_grad and id(p) not in in_groups for p in s.seed.parameters())]
        if missing:
            raise FailedPreconditionError(
                f"seed parameters of slot(s) {missing} are in no param group of the optimizer, "
                "so they never train; call grower.attach_optimizer(optimizer) with the optimizer "
                "you step", reason="SEED_NOT_OPTIMIZED")

    def _control(self, held_out: tuple[Any, Any] | None
                 ) -> tuple[health_pb2.HealthSnapshot, list[decision_pb2.Decision], dict[int, str]]:
        assert self.controller is not None and self.kernels is not None and self.loss_fn is not None
        t0 = time.perf_counter()
        contributions: dict[str, float] = {}
        if held_out:
            with FlopCounterMode(display=False) as counter:
                contributions = self.model.measure_contribution(*held_out, self.loss_fn)
            self._decision_flops += float(counter.get_total_flops())
        self._contribution_ms = (time.perf_counter() - t0) * 1e3
        snapshot = self.snapshot(contributions)
        asked: list[int] = []

        def source(site: Any) -> list[Any]:
            answer = self.kernels.candidates(site)
            asked.append(len(answer))
            return answer

        candidates, errors = offered_kernels(snapshot, source)
        kernels = getattr(self.kernels, "component", "kernels")
        for e in errors:
            self.record_degradation(kernels, e.reason.lower(), f"no kernel candidates: {e}")
        if not errors and asked and not any(asked):
            if kernels not in self.degraded:
                open_ = ", ".join(f"{s.slot_id} ({site_key(s.site)})" for s in snapshot.slots
                                  if s.slot_id in candidates)
                self.record_degradation(
                    kernels, "no_kernels_fit",
                    f"the kernel source offers no kernel for any open slot ({open_}); nothing "
                    "can grow until it does (offer blueprints for these sites' layouts and "
                    "slot kinds)")
        elif not errors and any(asked) and kernels in self.degraded:
            self.record_degradation(kernels, "recovered", "kernel candidates offered again",
                                    recovered=True)
        decisions = self._decide(snapshot, candidates)
        if self._wants_probes(decisions, candidates, held_out):
            t1 = time.perf_counter()
            if self._probe(snapshot, candidates, decisions, held_out):
                decisions = self._decide(snapshot, candidates)
            self._probe_ms = (time.perf_counter() - t1) * 1e3
        self._record_boundary(snapshot)
        self.emit("health", snapshot)
        rejected = self.apply(decisions)
        return snapshot, decisions, rejected

    def _wants_probes(self, decisions: Sequence[decision_pb2.Decision],
                      candidates: Mapping[str, Sequence[Any]], held_out: Any) -> bool:
        """Probe when the controller would germinate, reads probes (it says so with
        `uses_probes = True`: the heuristic does, random and fixed do not), and there is data."""
        return (self.config.probe_steps > 0 and held_out is not None
                and getattr(self.controller, "uses_probes", False)
                and any(d.kind == _Kind.DECISION_KIND_GERMINATE for d in decisions)
                and any(candidates.values()) and rows(held_out[0]) >= 2)

    def _probe(self, snapshot: health_pb2.HealthSnapshot, candidates: Mapping[str, Sequence[Any]],
               decisions: Sequence[decision_pb2.Decision], held_out: tuple[Any, Any]) -> bool:
        """Probe the offered kernels (the slots the controller chose first); results go into
        `snapshot.probes` (each naming its slot). Returns whether anything was probed."""
        assert self.loss_fn is not None
        chosen = [d.slot_id for d in decisions if d.kind == _Kind.DECISION_KIND_GERMINATE]
        order = chosen + [s.slot_id for s in snapshot.slots if s.slot_id not in chosen]
        settings = ProbeSettings(steps=self.config.probe_steps, lr=self.config.probe_lr)
        if self.probe_batch is not None:
            fit, evaluate = self.probe_batch, held_out
        else:
            fit, evaluate = split_rows(held_out, self.config.probe_fit_fraction)
        left = self.config.probe_max_kernels
        by_slot = {s.slot_id: s for s in snapshot.slots}
        record: dict[str, list[list[Any]]] = {}
        for slot_id in order:
            offered = list(candidates.get(slot_id, ()))[:left]
            if not offered or slot_id not in by_slot:
                continue
            site = self.model.site_signature(slot_id)
            seeds = []
            for c in offered:
                try:
                    seeds.append((c, self._load_kernel(c.kernel_id, site)))
                except EsperError as e:
                    _log.info("run %s: kernel %s not probed at %s: %s", self.run_id,
                              c.kernel_id, slot_id, e)
            left -= len(offered)
            if not seeds:
                continue
            probes = probe_slot(self.model, slot_id, seeds, fit, evaluate, self.loss_fn, settings)
            snapshot.probes.extend(probes)
            self._decision_flops += sum(p.flops for p in probes)
            record[slot_id] = [[p.kernel_id, p.gain, p.gain_stderr, p.steps, p.flops]
                               for p in probes]
            if left <= 0:
                break
        if record:
            self.history.probes.append({"epoch": self.epoch, "slots": record})
        return bool(record)

    def _record_boundary(self, snapshot: health_pb2.HealthSnapshot) -> None:
        """Keep this boundary's slot records (what later snapshots' `HealthSnapshot.slot_records` shows)."""
        records = self.history.slot_records
        if records and records[-1]["epoch"] == snapshot.epoch:
            records.pop()  # the same boundary again (a caller re-running it): latest wins
        records.append({"epoch": snapshot.epoch, "slots": slot_records(snapshot)})

    def snapshot(self, contributions: Mapping[str, float] | None = None) -> health_pb2.HealthSnapshot:
        """The `HealthSnapshot` a controller would see now (no contribution measured here),
        with each slot's history: the recorded boundaries and this one."""
        total = self.config.total_epochs or 0
        snap = build_snapshot(
            self.model, run_id=self.run_id, epoch=self.epoch, total_epochs=total,
            train_loss=self.history.train_loss, val_loss=self.history.val_loss,
            val_accuracy=self.history.val_accuracy, host_parameters=self.host_parameters,
            budget=Budget(seeds_left=max(0, self.config.max_seeds - self.seeds_germinated),
                          parameters_left=self.parameters_left()),
            contributions=dict(contributions or {}), graph=model_graph(self.model, self._order),
            task=self.config.task,
        )
        attach_history(snap, self.history.slot_records)
        return snap

    def _decide(self, snapshot: health_pb2.HealthSnapshot, candidates: Mapping[str, Any]
                ) -> list[decision_pb2.Decision]:
        assert self.controller is not None
        component = getattr(self.controller, "component", "controller")
        try:
            decisions = list(self.controller.decide(snapshot, candidates))
        except EsperError as e:
            self.record_degradation(component, e.reason.lower(), f"no growth decision this boundary: {e}")
            return []
        if component in self.degraded:
            self.record_degradation(component, "recovered", "controller answered again", recovered=True)
        return decisions

    # ---- applying decisions ------------------------------------------------------------

    def apply(self, decisions: Sequence[decision_pb2.Decision]) -> dict[int, str]:
        """Apply each decision through Kasmina; returns index → why it was rejected.

        A decision that cannot be applied (illegal now, budget spent, kernel unavailable,
        a failed gate) is recorded with its reason, never raised. Emits one `decision` event.
        """
        rejected: dict[int, str] = {}
        for i, d in enumerate(decisions):
            why = self._apply_one(d)
            # Outside `_apply_one`'s error handling: a scheduler that cannot follow a seed
            # group is a setup error to raise, not a decision to reject.
            self._sync_schedulers()
            if why:
                rejected[i] = why
            if d.kind != _Kind.DECISION_KIND_WAIT:
                self.history.decisions.append({
                    "epoch": self.epoch, "kind": _Kind.Name(d.kind), "slot": d.slot_id,
                    "kernel_id": d.kernel_id, "reason": d.reason, "rejected": why,
                })
        if decisions:
            self.emit("decision", events_pb2.DecisionEvent(decisions=decisions, rejected=rejected))
        return rejected

    def _apply_one(self, d: decision_pb2.Decision) -> str:
        """Why `d` could not be applied, or "" when it was."""
        if d.kind == _Kind.DECISION_KIND_WAIT:
            return ""
        if d.slot_id not in self.model.slots:
            return f"no slot {d.slot_id!r}; slots: {', '.join(self.model.slots)}"
        try:
            if d.kind == _Kind.DECISION_KIND_GERMINATE:
                return self._germinate(d)
            if d.kind == _Kind.DECISION_KIND_PRUNE:
                self.model.prune(d.slot_id, d.reason or "controller decision")
            elif d.kind == _Kind.DECISION_KIND_FOSSILIZE:
                self.model.fossilize(d.slot_id, d.reason or "controller decision")
            else:
                return f"decision kind {d.kind} is not an action"
        except EsperError as e:
            return f"{e.reason}: {e}"
        return ""

    def _germinate(self, d: decision_pb2.Decision) -> str:
        assert self.kernels is not None
        if self.seeds_germinated >= self.config.max_seeds:
            return f"seed budget spent ({self.config.max_seeds} germinated)"
        legal = self.model.legal_actions(d.slot_id)
        if "germinate" not in legal:
            return f"germinate is not legal for slot {d.slot_id!r} now (legal: {sorted(legal)})"
        component = getattr(self.kernels, "component", "kernels")
        try:
            seed = self._load_kernel(d.kernel_id, self.model.site_signature(d.slot_id))
        except NotFoundError as e:
            return f"kernel unavailable: {e}"
        except EsperError as e:
            # The source is down or the artifact is unverifiable: growth waits, training does not.
            self.record_degradation(component, e.reason.lower(), f"kernel {d.kernel_id!r} not loaded: {e}")
            return f"kernel unavailable: {e}"
        if component in self.degraded:
            self.record_degradation(component, "recovered", f"kernel {d.kernel_id!r} loaded",
                                    recovered=True)
        added = count(seed.parameters())
        if added > self.parameters_left():
            return f"kernel adds {added} parameters, more than the {self.parameters_left()} left"
        try:
            self.model.germinate(d.slot_id, seed, kernel_id=d.kernel_id,
                                 blueprint_id=d.blueprint_id or d.kernel_id,
                                 reason=d.reason or "controller decision")
        except EsperError as e:
            return f"{e.reason}: {e}"
        self.seeds_germinated += 1
        return ""

    def prune_live(self, reason: str) -> list[str]:
        """Prune every seed that is not fossilized (a governor's rollback); returns their slots."""
        pruned = []
        for slot_id, slot in self.model.slots.items():
            if slot.current_stage in PRUNABLE_STAGES:
                self.model.prune(slot_id, reason)
                pruned.append(slot_id)
        self._sync_schedulers()
        return pruned

    # ---- events ------------------------------------------------------------------------

    def emit(self, payload: str, message: Any, *, source: str | None = None,
             step: int | None = None, epoch: int | None = None) -> events_pb2.EventEnvelope:
        """Emit an event in this run's sequence (callers may emit their own kinds too).

        Args:
            payload: the `EventEnvelope` payload field ("run_state", "degradation", ...).
            message: the payload message.
            source: `EventEnvelope.source` (default: the grower's `event_source`).
        """
        return self.events.emit(payload, message, source=source or self.event_source,
                                step=self.global_step if step is None else step,
                                epoch=self.epoch if epoch is None else epoch)

    def record_degradation(self, component: str, kind: str, detail: str, *,
                           recovered: bool = False) -> None:
        """Record (log + `DegradationEvent`) that `component` degraded, or recovered."""
        if recovered:
            self.degraded.discard(component)
        else:
            self.degraded.add(component)
        _log.warning("run %s degraded: %s %s: %s", self.run_id, component, kind, detail)
        self._degradations.append(f"{component} {kind}: {detail}")
        self.emit("degradation", events_pb2.DegradationEvent(component=component, kind=kind, detail=detail))

    def _on_kasmina_event(self, event: KasminaEvent) -> None:
        payload = "lifecycle" if event.kind == "transition" else "gate"
        self.emit(payload, event.to_proto(), source="kasmina", step=self.global_step)

    def _close(self, decisions: list[decision_pb2.Decision], rejected: dict[int, str],
               snapshot: health_pb2.HealthSnapshot | None, control_ms: float,
               learning_rate: float | None, train_flops: float) -> EpochReport:
        slots = self.model.slots
        stages = {sid: s.current_stage.name for sid, s in slots.items()}
        alphas = {sid: s.alpha for sid, s in slots.items()}
        lr = learning_rate
        if lr is None:
            lr = float(self.optimizer.param_groups[self.config.template_group]["lr"])
        h = self.history
        h.parameters.append(self.parameters())
        h.learning_rate.append(lr)
        h.stages.append(stages)
        h.train_flops.append(float(train_flops))
        h.decision_flops.append(self._decision_flops)
        now = time.perf_counter()
        self.emit("epoch_metrics", events_pb2.EpochMetrics(
            epoch=self.epoch,
            total_epochs=self.config.total_epochs or 0,
            train_loss=h.train_loss[-1] if h.train_loss else 0.0,
            val_loss=h.val_loss[-1] if h.val_loss else 0.0,
            val_accuracy=h.val_accuracy[-1] if h.val_accuracy else 0.0,
            parameters=h.parameters[-1],
            learning_rate=lr,
            epoch_seconds=now - self._epoch_t0,
            train_flops=train_flops,
            alphas=alphas,
            stages={sid: int(s.current_stage) for sid, s in slots.items()},
            control_ms=control_ms,
            decision_flops=self.decision_flops(),
        ))
        self._epoch_t0 = now
        return EpochReport(epoch=self.epoch, snapshot=snapshot, decisions=decisions,
                           rejected=rejected, degraded=list(self._degradations), stages=stages,
                           alphas=alphas, parameters=h.parameters[-1], control_ms=control_ms,
                           contribution_ms=self._contribution_ms, probe_ms=self._probe_ms,
                           decision_flops=self._decision_flops)

    # ---- views -------------------------------------------------------------------------

    def parameters(self) -> int:
        """Parameters of the model now: host plus live and fossilized seeds."""
        return count(self.model.parameters())

    def decision_flops(self) -> float:
        """FLOPs of the grower's own boundary work so far (contribution forwards, probes)."""
        return float(sum(self.history.decision_flops))

    def parameters_left(self) -> int:
        bound = self.config.max_added_parameters
        if bound is None:
            return UNBOUNDED_PARAMETERS
        return max(0, bound - (self.parameters() - self.host_parameters))

    def fossilized(self) -> dict[str, str]:
        """Slot id → kernel id of every fossilized seed (the grown topology)."""
        return {sid: s.kernel_id for sid, s in self.model.slots.items()
                if s.current_stage is SeedStage.FOSSILIZED}

    def live(self) -> dict[str, str]:
        """Slot id → stage name of every slot holding a seed."""
        return {sid: s.current_stage.name for sid, s in self.model.slots.items()
                if s.current_stage in LIVE_STAGES}

    # ---- take it away ------------------------------------------------------------------

    def fold(self, *, live: str = "refuse") -> nn.Module:
        """A plain copy of the model with fossilized seeds folded in (see `esper.grow.export.fold`)."""
        from esper.grow.export import fold

        return fold(self.model, live=live)

    def export(self, directory: str | Path, *, live: str = "refuse") -> Path:
        """Write the folded model as safetensors + manifest (see `esper.grow.export.export`)."""
        from esper.grow.export import export

        return export(self.model, directory, live=live)

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The grower's part of a checkpoint: seeds, slot state, budget, history, events.

        The host's own weights are not in it (save `model.state_dict()` as usual). Tensors
        and plain data only: `torch.save`/`torch.load(weights_only=True)` handle it.
        """
        slots = {k: v for k, v in self.model.state_dict().items() if not k.startswith("host.")}
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "sequence": self.events.sequence,
            "seeds_germinated": self.seeds_germinated,
            "degraded": sorted(self.degraded),
            "steps_at_boundary": self._steps_at_boundary,
            "history": self.history.to_dict(),
            "slots": slots,
        }
        for name, part in (("controller", self.controller), ("kernels", self.kernels)):
            if isinstance(part, Stateful):
                state[name] = part.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`: seeds are rebuilt through `kernels` and rejoin the optimizer.

        Load it before `optimizer.load_state_dict(...)` and `scheduler.load_state_dict(...)`
        (their param groups include the seeds'); the host's `load_state_dict` may come
        before or after.

        Raises:
            ConfigError: a state of another format or for other sites.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(f"grower state of format {got!r}; this grower reads format {STATE_FORMAT}")
        host = {f"host.{k}": v for k, v in self.model.host.state_dict().items()}
        try:
            self.model.load_state_dict({**host, **state["slots"]}, strict=True)
        except RuntimeError as e:
            raise ConfigError(
                f"grower state does not fit this model's slots {list(self.model.slots)}: {e}") from e
        self._sync_schedulers()
        self.events.run_id = str(state["run_id"])
        self.events.sequence = int(state["sequence"])
        self.seeds_germinated = int(state["seeds_germinated"])
        self.degraded = set(state["degraded"])
        self._steps_at_boundary = int(state["steps_at_boundary"])
        self.history = GrowthHistory.from_dict(state["history"])
        for name, part in (("controller", self.controller), ("kernels", self.kernels)):
            if name in state and isinstance(part, Stateful):
                part.load_state_dict(state[name])
