"""Tolaria's training loop: a host wrapped with seed slots, grown by a controller.

The loop is the story:

    for each epoch:
        train_epoch()       # pure torch; the governor watches every step's loss
        evaluate()          # validation loss and accuracy
        maybe_control()     # health snapshot → controller → germinate / prune / fossilize
        maybe_checkpoint()  # atomic, pickle-free, resumable bit for bit

Control runs before the checkpoint (not after) so that a checkpoint holds the effects of
the decisions taken at its boundary, and a resumed run never asks the controller twice.

What is trained is a `Job` (`esper.jobs`): the model, data loaders, loss and metric a
registered job function built; `Trainer(config)` builds the run's job itself from the
registry when it is not given one. Everything around the loop is pluggable: a `Controller` decides (an in-process Tamiyo
policy for the benchmark, the gRPC Tamiyo client under the service), a `KernelProvider`
turns a kernel id into a seed module (the built-in catalog in process, Urza plus Kasmina's
`KernelLoader` under the service), and `event_sink` receives every event as an
`esper.oona.v1.EventEnvelope` (the worker forwards them to Oona and WatchRun).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from torch import nn

from esper.errors import ConfigError, EsperError, FailedPreconditionError, NotFoundError
from esper.jobs.registry import JobRegistry, default_registry
from esper.jobs.sites import resolve_sites
from esper.jobs.spec import Job
from esper.kasmina import KasminaConfig, KasminaEvent, MorphogeneticModel, SeedStage, wrap
from esper.tasks.hosts import STATIC_SEED
from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import RunConfig
from esper.tolaria.flops import FlopMeter
from esper.tolaria.governor import Governor, GovernorConfig
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2

_log = logging.getLogger(__name__)

EventSink = Callable[[events_pb2.EventEnvelope], None]
UNBOUNDED_PARAMETERS = 2**63 - 1
"""`HealthSnapshot.parameters_left` when the budget sets no parameter bound."""
CONTRIBUTION_ROWS = 256
"""Validation rows the counterfactual contribution is measured on (a fixed held-out batch)."""

_PRUNABLE = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING)


class Controller(Protocol):
    """Decides growth at an epoch boundary.

    Raises an `EsperError` (e.g. `UnavailableError`, `DeadlineExceededError`) when it
    cannot answer; the run then continues without growth and records a degradation.
    """

    def decide(self, snapshot: health_pb2.HealthSnapshot) -> Sequence[decision_pb2.Decision]: ...


@runtime_checkable
class StatefulController(Protocol):
    """A controller whose memory must survive a resume (stored in the checkpoint as JSON)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class KernelProvider(Protocol):
    """Turns a kernel id into a seed module.

    `site` is the slot's signature at germination, and None when Kasmina re-materialises a
    seed from a checkpoint (the kernel id alone must then suffice). Raises an `EsperError`
    when the kernel cannot be had (not found, unverifiable, Urza unavailable).
    """

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None) -> nn.Module: ...


@dataclass(kw_only=True)
class History:
    """Per-epoch records of a run (index i = epoch i + 1)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    parameters: list[int] = field(default_factory=list)
    train_flops: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    alphas: list[dict[str, float]] = field(default_factory=list)
    stages: list[dict[str, str]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """Every decision applied or rejected: epoch, kind, slot, kernel, outcome."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        return cls(**{k: list(v) for k, v in d.items()})


@dataclass(kw_only=True)
class RunResult:
    """How a run ended."""

    completed: bool
    """False when it stopped early on request (a checkpoint holds where it was)."""
    epochs: int
    global_step: int
    test_loss: float
    test_accuracy: float
    val_accuracy: float
    parameters: int
    """Trainable parameters at the end (host + live and fossilized seeds)."""
    train_flops: float
    wall_seconds: float
    rollbacks: int
    fossilized: dict[str, str]
    """slot id → kernel id of every fossilized seed (the grown topology)."""
    history: History


def build_job(config: RunConfig, registry: JobRegistry | None = None) -> Job:
    """The run's job, built by its registered function under the run's seed.

    torch's global RNG is seeded with `config.seed` first, so the job's model starts from
    the same weights every time the run (or its resumed worker) builds it.

    Raises:
        JobConfigError: the job is not registered or a parameter is bad (field named).
        JobBuildError: the job function raised or returned no `Job`.
    """
    name, params = config.job_spec()
    torch.manual_seed(config.seed)
    return (registry or default_registry()).build(
        name, params, run={"seed": config.seed, "batch_size": config.batch_size})


class Trainer:
    """One training run. Build it, optionally `resume()`, then `run()`.

    Args:
        config: the run.
        job: what to train; None: `build_job(config)` (built-in jobs and entry points).
        run_id: identifies the run in events and snapshots.
        kernels: where seed modules come from.
        controller: decides growth; None trains the host as it is.
        event_sink: receives every event envelope (None: events are only counted).
        checkpoint_dir: where checkpoints go (None: none are written).
        kasmina: seed-slot behaviour (incubation, blending, gates).
        governor: divergence detection and rollback limits.
        host_setup: called on the freshly built host before wrapping (the static-final
            baseline fixes seed modules into the host here).
        stop: set from any thread to stop at the next step boundary.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        run_id: str,
        job: Job | None = None,
        kernels: KernelProvider,
        controller: Controller | None = None,
        event_sink: EventSink | None = None,
        checkpoint_dir: Path | None = None,
        kasmina: KasminaConfig | None = None,
        governor: GovernorConfig | None = None,
        host_setup: Callable[[nn.Module], None] | None = None,
        stop: threading.Event | None = None,
        keep_checkpoints: int = 2,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.kernels = kernels
        self.controller = controller
        self.event_sink = event_sink
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.stop = stop or threading.Event()
        self.governor = Governor(governor)
        self.flops = FlopMeter()
        self.history = History()
        self.sequence = 0
        self.epoch = 0
        """Epochs completed."""
        self.global_step = 0
        self._step_in_epoch = 0
        self._epoch_acc = {"loss_sum": 0.0, "seen": 0}
        self.seeds_germinated = 0
        self.degraded: set[str] = set()
        self._control_ms = 0.0
        self._decide_ms = 0.0
        self._epoch_t0 = time.perf_counter()

        self.job = job if job is not None else build_job(config)
        host = self.job.model
        if host_setup is not None:
            host_setup(host)
        self.sites = resolve_sites(host, config.sites or self.job.sites)
        example = self.job.example_input
        self._graph_order = _execution_order(host, example)
        self.model: MorphogeneticModel = wrap(
            host,
            sites=self.sites,
            example_input=example,
            config=kasmina or KasminaConfig(),
            event_sink=self._on_kasmina_event,
            kernel_resolver=lambda kernel_id: self.kernels.load(kernel_id, None),
        )
        self.host_parameters = _count(self.model.host.parameters())
        self.optimizer = self._build_optimizer()
        self.model.attach_optimizer(self.optimizer)
        try:
            self.steps_per_epoch = len(self.job.train_loader)
        except TypeError:
            raise ConfigError(
                f"job {self.job.name!r}: its train_loader has no length; the schedule needs the "
                "number of batches per epoch (give the dataset a __len__)") from None
        if self.steps_per_epoch < 1:
            raise ConfigError(f"job {self.job.name!r}: its train_loader yields no batches")
        self.total_steps = config.epochs * self.steps_per_epoch
        self._contribution_batch = _head(next(iter(self.job.val_loader)), CONTRIBUTION_ROWS)
        self._started = time.perf_counter()
        self._elapsed_before = 0.0
        self._remember_good()

    # ----- the story -----

    def run(self) -> RunResult:
        """Train until the last epoch or a stop request; returns the outcome."""
        self._started = time.perf_counter()
        while self.epoch < self.config.epochs:
            if not self.train_epoch():
                self.save_checkpoint()
                return self._result(completed=False)
            self.evaluate()
            self.maybe_control()
            self.maybe_checkpoint()
        test = None
        if self.job.test_loader is not None:
            test = self._eval_on(self.job.test_loader)
        return self._result(completed=True, test=test)

    def train_epoch(self) -> bool:
        """One pass over the training set in this epoch's fixed order.

        Returns False when a stop was requested (the model is at a step boundary).
        """
        self._epoch_t0 = time.perf_counter()
        self.model.train()
        batches = iter(_epoch_batches(self.job.train_loader, self.epoch))
        for _ in range(self._step_in_epoch):  # resumed mid-epoch: replay up to where it was
            next(batches)
        for x, y in batches:
            if self.stop.is_set():
                return False
            loss = self._train_step(x, y)
            self._step_in_epoch += 1
            why = self.governor.check(loss)
            if why is not None:
                self._roll_back(why)
                break
            n = _rows(y)
            self._epoch_acc["loss_sum"] += loss * n
            self._epoch_acc["seen"] += n
        seen = self._epoch_acc["seen"]
        self.history.train_loss.append(self._epoch_acc["loss_sum"] / seen if seen else float("nan"))
        self._step_in_epoch = 0
        self._epoch_acc = {"loss_sum": 0.0, "seen": 0}
        self.model.end_epoch()
        self.epoch += 1
        return True

    def evaluate(self) -> None:
        loss, acc = self._eval_on(self.job.val_loader)
        self.history.val_loss.append(loss)
        self.history.val_accuracy.append(acc)

    def maybe_control(self) -> None:
        """Ask the controller at this boundary (not after the last epoch) and apply its answer."""
        t0 = time.perf_counter()
        if self.controller is not None and self.epoch < self.config.epochs:
            snapshot = self.snapshot()
            self._emit("health", snapshot)
            self._apply(self._decide(snapshot))
        self._control_ms = (time.perf_counter() - t0) * 1e3
        self._record_epoch()
        self._remember_good()

    def maybe_checkpoint(self) -> None:
        every = self.config.checkpoint_every
        last = self.epoch == self.config.epochs
        if self.checkpoint_dir is not None and (last or (every and self.epoch % every == 0)):
            self.save_checkpoint()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Host parameters only; Kasmina adds each seed's own param group at germination."""
        o = self.config.optimizer
        params = list(self.model.host.parameters())
        if o.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=o.learning_rate, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=o.weight_decay)
        # Kasmina removes a pruned seed's group with `param_groups.remove(group)`, which
        # compares groups by value and raises on their tensors once two seed groups exist;
        # groups are identities, so remove them by identity.
        opt.param_groups = _IdentityList(opt.param_groups)
        return opt

    # ----- one step -----

    def _train_step(self, x: Any, y: Any) -> float:
        self._set_learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        with self.flops.step(_rows(y)):
            loss = self.job.loss_fn(_forward(self.model, x), y)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            # Do not let a non-finite step touch the weights; the governor rolls back.
            self.optimizer.zero_grad(set_to_none=True)
            return value
        clip = self.config.optimizer.clip_grad_norm
        if clip > 0:
            self.model.clip_grad_norms(clip, clip)
        self.optimizer.step()
        self.model.step()
        self.global_step += 1
        return value

    def learning_rate_factor(self, step: int) -> float:
        """Multiplier of the peak rate at step position `step` of the run (0-based).

        The position is epoch × steps per epoch + batch index, not a count of steps taken,
        so steps skipped by a governor rollback do not shift the schedule. Cosine reaches
        exactly 0 at the run's last step, so every arm of a comparison ends fully decayed
        at the same point whatever it grew.
        """
        o = self.config.optimizer
        warm = o.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - 1 - warm)
        progress = min(1.0, (step - warm) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _set_learning_rate(self) -> None:
        factor = self.learning_rate_factor(self.epoch * self.steps_per_epoch + self._step_in_epoch)
        peak = self.config.optimizer.learning_rate
        seed_peak = self.model.config.seed_lr
        for group in self.optimizer.param_groups:
            base = seed_peak if (seed_peak is not None and "kasmina_slot" in group) else peak
            group["lr"] = base * factor

    @torch.no_grad()
    def _eval_on(self, loader: Any) -> tuple[float, float]:
        """(loss, metric) over `loader`, each the row-weighted mean of its batch values
        (metric NaN when the job has none)."""
        was = self.model.training
        self.model.eval()
        batches: list[tuple[float, float, int]] = []
        metric_fn = self.job.metric_fn
        try:
            for x, y in loader:
                out = _forward(self.model, x)
                metric = float(metric_fn(out, y)) if metric_fn is not None else float("nan")
                batches.append((float(self.job.loss_fn(out, y)), metric, _rows(y)))
        finally:
            self.model.train(was)
        if not batches:
            raise ConfigError(f"job {self.job.name!r}: an evaluation loader yielded no batches")
        if len(batches) == 1:  # as it is: x * n / n need not round back to x
            return batches[0][0], batches[0][1]
        rows = sum(n for _, _, n in batches)
        return (sum(v * n for v, _, n in batches) / rows,
                sum(m * n for _, m, n in batches) / rows)

    # ----- control -----

    def snapshot(self) -> health_pb2.HealthSnapshot:
        """What the controller sees now (contribution measured on a held-out batch)."""
        contributions = self.model.measure_contribution(*self._contribution_batch, self.job.loss_fn)
        snap = health_pb2.HealthSnapshot(
            run_id=self.run_id,
            epoch=self.epoch,
            total_epochs=self.config.epochs,
            global_step=self.global_step,
            train_loss_history=self.history.train_loss,
            val_loss_history=self.history.val_loss,
            val_accuracy_history=self.history.val_accuracy,
            host_parameters=self.host_parameters,
            total_parameters=self.parameters(),
            seeds_left=max(0, self.config.budget.max_seeds - self.seeds_germinated),
            parameters_left=self.parameters_left(),
            task=self.config.job_name,
        )
        for h in self.model.health():
            slot = snap.slots.add()
            slot.CopyFrom(h.to_proto())
            if h.slot_id in contributions:
                slot.contribution = contributions[h.slot_id]
                slot.contribution_measured = True
            if not math.isfinite(slot.contribution):
                slot.finite = False
                slot.contribution = 0.0
        snap.graph.CopyFrom(self._graph())
        snap.taken_at.GetCurrentTime()
        return snap

    def _decide(self, snapshot: health_pb2.HealthSnapshot) -> list[decision_pb2.Decision]:
        assert self.controller is not None
        t0 = time.perf_counter()
        try:
            decisions = list(self.controller.decide(snapshot))
        except EsperError as e:
            self._degrade("tamiyo", e.reason.lower(), f"no growth decision this boundary: {e}")
            return []
        if "tamiyo" in self.degraded:
            self.degraded.discard("tamiyo")
            self._degrade("tamiyo", "recovered", "controller answered again", recovered=True)
        self._decide_ms = (time.perf_counter() - t0) * 1e3
        return decisions

    def _apply(self, decisions: Sequence[decision_pb2.Decision]) -> None:
        """Apply each decision through Kasmina; an illegal one is recorded, never fatal."""
        rejected: dict[int, str] = {}
        for i, d in enumerate(decisions):
            why = self._apply_one(d)
            if why:
                rejected[i] = why
            if d.kind != decision_pb2.DECISION_KIND_WAIT:
                self.history.decisions.append({
                    "epoch": self.epoch, "kind": decision_pb2.DecisionKind.Name(d.kind),
                    "slot": d.slot_id, "kernel_id": d.kernel_id, "reason": d.reason,
                    "rejected": why,
                })
        if decisions:
            self._emit("decision", events_pb2.DecisionEvent(
                decisions=decisions, rejected=rejected, latency_ms=self._decide_ms))

    def _apply_one(self, d: decision_pb2.Decision) -> str:
        """Why `d` could not be applied, or "" when it was."""
        kind = d.kind
        if kind == decision_pb2.DECISION_KIND_WAIT:
            return ""
        if d.slot_id not in self.model.slots:
            return f"no slot {d.slot_id!r}; slots: {', '.join(self.model.slots)}"
        try:
            if kind == decision_pb2.DECISION_KIND_GERMINATE:
                return self._germinate(d)
            if kind == decision_pb2.DECISION_KIND_PRUNE:
                self.model.prune(d.slot_id, d.reason or "controller decision")
            elif kind == decision_pb2.DECISION_KIND_FOSSILIZE:
                self.model.fossilize(d.slot_id, d.reason or "controller decision")
            else:
                return f"decision kind {kind} is not an action"
        except EsperError as e:
            return f"{e.reason}: {e}"
        return ""

    def _germinate(self, d: decision_pb2.Decision) -> str:
        if self.seeds_germinated >= self.config.budget.max_seeds:
            return f"seed budget spent ({self.config.budget.max_seeds} germinated)"
        if "germinate" not in self.model.legal_actions(d.slot_id):
            return f"germinate is not legal for slot {d.slot_id!r} now (legal: {sorted(self.model.legal_actions(d.slot_id))})"
        try:
            seed = self.kernels.load(d.kernel_id, self.model.site_signature(d.slot_id))
        except NotFoundError as e:
            return f"kernel unavailable: {e}"
        except EsperError as e:
            # Urza down or an unverifiable artifact: growth waits, training does not.
            self._degrade("urza", e.reason.lower(), f"kernel {d.kernel_id!r} not loaded: {e}")
            return f"kernel unavailable: {e}"
        if "urza" in self.degraded:
            self.degraded.discard("urza")
            self._degrade("urza", "recovered", f"kernel {d.kernel_id!r} loaded", recovered=True)
        added = _count(seed.parameters())
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

    # ----- the governor -----

    def _roll_back(self, why: str) -> None:
        """Restore the last good state, prune every live seed, reset optimizer state."""
        good = self.governor.begin_rollback(why)
        self.model.load_state_dict(good.model)
        pruned = []
        for slot_id, slot in self.model.slots.items():
            if slot.current_stage in _PRUNABLE:
                self.model.prune(slot_id, f"governor rollback: {why}")
                pruned.append(slot_id)
        self.optimizer.state.clear()
        self.flops.invalidate()
        self._degrade(
            "governor", "rollback",
            f"{why}; rolled back to the state after epoch {good.epoch}, pruned "
            f"{pruned or 'no seeds'}, optimizer state reset (rollback {self.governor.rollbacks})",
        )

    def _remember_good(self) -> None:
        self.governor.remember(self.epoch, self.model.state_dict(), self.optimizer.state_dict())

    # ----- checkpoints -----

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run as it is now (at a step boundary)."""
        if self.checkpoint_dir is None:
            return None
        tensors, meta = self._state()
        path = ckpt.checkpoint_path(self.checkpoint_dir, self.epoch)
        ckpt.save(path, tensors, meta)
        ckpt.prune_old(self.checkpoint_dir, self.keep_checkpoints)
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load `path` (default: the latest checkpoint in `checkpoint_dir`); False if none."""
        if path is None:
            if self.checkpoint_dir is None:
                return False
            path = ckpt.latest_checkpoint(self.checkpoint_dir)
            if path is None:
                return False
        tensors, meta = ckpt.load(path)
        saved = meta["config"]
        current = self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            raise FailedPreconditionError(
                f"checkpoint {path} is of a run with a different config ({', '.join(differ)} "
                f"differ); resume it with the config it was written with"
            )
        model_state: dict[str, Any] = {k[len("model/"):]: v for k, v in tensors.items()
                                       if k.startswith("model/")}
        model_state.update(meta["model_extra"])
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, meta["optimizer"]))
        t = meta["trainer"]
        self.epoch, self.global_step = t["epoch"], t["global_step"]
        self._step_in_epoch, self._epoch_acc = t["step_in_epoch"], dict(t["epoch_acc"])
        self.sequence, self.seeds_germinated = t["sequence"], t["seeds_germinated"]
        self._elapsed_before = t["elapsed"]
        self.history = History.from_dict(t["history"])
        self.flops.load_state_dict(t["flops"])
        self.governor.rollbacks = t["rollbacks"]
        if "controller" in t and isinstance(self.controller, StatefulController):
            self.controller.load_state_dict(t["controller"])
        torch.set_rng_state(tensors["rng/torch"])
        r = t["rng_python"]
        random.setstate((r[0], tuple(r[1]), r[2]))
        n = t["rng_numpy"]
        np.random.set_state((n[0], tensors["rng/numpy"].numpy().astype(np.uint32), n[1], n[2], n[3]))
        self._remember_good()
        return True

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        sd = self.model.state_dict()
        tensors = {f"model/{k}": v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        model_extra = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        opt_tensors, opt_structure = ckpt.flatten_optimizer(self.optimizer.state_dict(), "optim/")
        tensors.update(opt_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        np_state = np.random.get_state()
        tensors["rng/numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        trainer = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self._step_in_epoch,
            "epoch_acc": self._epoch_acc,
            "sequence": self.sequence,
            "seeds_germinated": self.seeds_germinated,
            "elapsed": self._elapsed_before + time.perf_counter() - self._started,
            "history": self.history.to_dict(),
            "flops": self.flops.state_dict(),
            "rollbacks": self.governor.rollbacks,
            "rng_python": random.getstate(),
            "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        }
        if isinstance(self.controller, StatefulController):
            trainer["controller"] = self.controller.state_dict()
        meta = {
            "run_id": self.run_id,
            "config": self.config.to_dict(),
            "model_extra": model_extra,
            "optimizer": opt_structure,
            "trainer": trainer,
        }
        return tensors, meta

    # ----- views -----

    def parameters(self) -> int:
        return _count(self.model.parameters())

    def parameters_left(self) -> int:
        bound = self.config.budget.max_added_parameters
        if bound == 0:
            return UNBOUNDED_PARAMETERS
        return max(0, bound - (self.parameters() - self.host_parameters))

    def fossilized(self) -> dict[str, str]:
        return {sid: s.kernel_id for sid, s in self.model.slots.items()
                if s.current_stage is SeedStage.FOSSILIZED}

    def _graph(self) -> health_pb2.ModelGraph:
        """Leaf modules in execution order, a slot node after each site, chained."""
        graph = health_pb2.ModelGraph()
        modules = dict(self.model.host.named_modules())
        slots = self.model.slots
        for name in self._graph_order:
            mod = modules[name]
            graph.nodes.add(name=name, kind=type(mod).__name__.lower(),
                            parameters=_count(mod.parameters()))
            if name in slots:
                seed = slots[name].seed
                graph.nodes.add(name=f"{name}/slot", kind="slot", slot_id=name,
                                parameters=_count(seed.parameters()) if seed is not None else 0)
        for i in range(len(graph.nodes) - 1):
            graph.edges.add(src=i, dst=i + 1)
        return graph

    def _result(self, *, completed: bool, test: tuple[float, float] | None = None) -> RunResult:
        test_loss, test_acc = test if test is not None else (float("nan"), float("nan"))
        return RunResult(
            completed=completed,
            epochs=self.epoch,
            global_step=self.global_step,
            test_loss=test_loss,
            test_accuracy=test_acc,
            val_accuracy=self.history.val_accuracy[-1] if self.history.val_accuracy else float("nan"),
            parameters=self.parameters(),
            train_flops=self.flops.total,
            wall_seconds=self._elapsed_before + time.perf_counter() - self._started,
            rollbacks=self.governor.rollbacks,
            fossilized=self.fossilized(),
            history=self.history,
        )

    # ----- events -----

    def emit(self, payload: str, message: Any, *, source: str = "tolaria", epoch: int | None = None,
             step: int | None = None) -> events_pb2.EventEnvelope:
        """Wrap `message` as the envelope's `payload` field and hand it to the sink.

        The worker uses this too (run state changes), so sequences stay one per run.
        Event ids are `<run id>/<sequence>`: a resumed run re-emits the same ids for the
        events it repeats, which JetStream's `Nats-Msg-Id` dedup then drops.
        """
        self.sequence += 1
        env = events_pb2.EventEnvelope(
            event_id=f"{self.run_id}/{self.sequence}",
            run_id=self.run_id,
            step=self.global_step if step is None else step,
            epoch=self.epoch if epoch is None else epoch,
            source=source,
            sequence=self.sequence,
        )
        env.emitted_at.CopyFrom(_now())
        getattr(env, payload).CopyFrom(message)
        if self.event_sink is not None:
            self.event_sink(env)
        return env

    _emit = emit

    def _on_kasmina_event(self, event: KasminaEvent) -> None:
        if event.kind == "transition":
            self.flops.invalidate()
            self.emit("lifecycle", event.to_proto(), source="kasmina", step=self.global_step)
        else:
            self.emit("gate", event.to_proto(), source="kasmina", step=self.global_step)

    def _degrade(self, component: str, kind: str, detail: str, *, recovered: bool = False) -> None:
        if not recovered:
            self.degraded.add(component)
        _log.warning("run %s degraded: %s %s: %s", self.run_id, component, kind, detail)
        self.emit("degradation", events_pb2.DegradationEvent(component=component, kind=kind, detail=detail))

    def _record_epoch(self) -> None:
        slots = self.model.slots
        alphas = {sid: s.alpha for sid, s in slots.items()}
        stages = {sid: s.current_stage for sid, s in slots.items()}
        h = self.history
        h.parameters.append(self.parameters())
        h.train_flops.append(self.flops.total)
        h.learning_rate.append(self.optimizer.param_groups[0]["lr"])
        h.alphas.append(alphas)
        h.stages.append({k: v.name for k, v in stages.items()})
        self.emit("epoch_metrics", events_pb2.EpochMetrics(
            epoch=self.epoch,
            total_epochs=self.config.epochs,
            train_loss=h.train_loss[-1],
            val_loss=h.val_loss[-1],
            val_accuracy=h.val_accuracy[-1],
            parameters=h.parameters[-1],
            learning_rate=h.learning_rate[-1],
            epoch_seconds=time.perf_counter() - self._epoch_t0,
            train_flops=self.flops.total,
            alphas=alphas,
            stages={k: int(v) for k, v in stages.items()},
            control_ms=self._control_ms,
        ))


class _IdentityList(list):
    """A list whose `remove` finds the element by identity, not equality."""

    def remove(self, value: Any) -> None:
        for i, item in enumerate(self):
            if item is value:
                del self[i]
                return
        raise ValueError("param group not in the optimizer")


def _epoch_batches(loader: Any, epoch: int) -> Any:
    """`loader`, its sampler told the epoch (`set_epoch`, as DistributedSampler and
    `esper.jobs.data.ShuffledBatches` have) so that a resume replays the epoch's order."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    return loader


def _forward(model: nn.Module, x: Any) -> Any:
    """Call the model on one batch's inputs: a tensor, positional inputs, or keyword inputs."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def _rows(y: Any) -> int:
    """Examples in a batch, read from its target (a tensor, or a sequence of them)."""
    if isinstance(y, torch.Tensor):
        return int(y.shape[0]) if y.dim() else 1
    if isinstance(y, Mapping):
        return _rows(next(iter(y.values())))
    if isinstance(y, tuple | list):
        return _rows(y[0]) if y and isinstance(y[0], torch.Tensor | Mapping | tuple | list) else len(y)
    raise ConfigError(f"batch target of type {type(y).__name__} has no row count; targets must "
                      "be tensors (or tuples/dicts of tensors)")


def _head(batch: Any, rows: int) -> tuple[Any, Any]:
    """The first `rows` rows of an (input, target) batch (the contribution batch)."""
    x, y = batch

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[:rows] if v.dim() else v
        if isinstance(v, Mapping):
            return {k: cut(t) for k, t in v.items()}
        if isinstance(v, tuple | list):
            return type(v)(cut(t) for t in v)
        return v

    return cut(x), cut(y)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _execution_order(host: nn.Module, example: Any) -> list[str]:
    """Names of the host's leaf modules in the order a forward pass runs them."""
    order: list[str] = []
    handles = []
    for name, mod in host.named_modules():
        # A site holding a static seed still counts as one node; the seed's insides do not.
        if STATIC_SEED in name.split("."):
            continue
        if name and all(child == STATIC_SEED for child, _ in mod.named_children()):
            handles.append(mod.register_forward_hook(
                lambda _m, _a, _o, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            was = host.training
            host.eval()
            _forward(host, example)
            host.train(was)
    finally:
        for h in handles:
            h.remove()
    return order
