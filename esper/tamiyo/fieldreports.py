"""Field reports → training data for the learned policy.

A **run report** is what one run under a behaviour policy teaches: at every epoch boundary
the snapshot the controller saw, the kernels on offer, the decisions taken (and which were
exploration, which a rule or Kasmina rejected), and for every seed it created how that seed
ended (its last measured counterfactual contribution, fossilized / pruned / rolled back /
still live, gate failures). Rewards (`boundary_rewards`) turn a report into one return per
boundary for the advantage-weighted objective (docs/LEARNED_CONTROL.md).

Reports are built from Tolaria's event stream alone (`reports_from_events`), so the same
code reads:

* runs trained in this process (`esper.experiments.fieldreports.collect_inprocess`: the
  Tolaria trainer with a behaviour policy, for `esper tamiyo train --collect-runs` and
  `esper bench controllers`; the top floor, since it runs Tolaria);
* runs of a live platform from JetStream (`read_jetstream`: the `health`, `decision`,
  `lifecycle`, `gate`, `epoch_metrics` and `degradation` events Tolaria published), with
  the kernels on offer and their outcome statistics from Urza (`UrzaCandidates`, over
  `QueryKernels`).

The behaviour policy (`ExploringPolicy`) is the heuristic plus ε-exploration: at each
boundary, with probability ε, its decisions are replaced by one random legal action (a
random slot, a random legal action there, a random affordable kernel), marked
`policy="explore"` on the decision so the record says which boundaries were exploration.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.config import from_dict
from esper.errors import ConfigError
from esper.tamiyo.policy import (
    FOSSILIZE,
    GERMINATE,
    PRUNE,
    Candidates,
    KernelCandidate,
    Policy,
    affordable,
    legal_actions,
)
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2

_log = logging.getLogger(__name__)

EXPLORE = "explore"
"""`Decision.policy` of an exploratory decision (the behaviour policy's random action)."""

_ACTION_KIND = {
    GERMINATE: decision_pb2.DECISION_KIND_GERMINATE,
    PRUNE: decision_pb2.DECISION_KIND_PRUNE,
    FOSSILIZE: decision_pb2.DECISION_KIND_FOSSILIZE,
}
_LIVE = frozenset({
    seed_pb2.SEED_STAGE_GERMINATED, seed_pb2.SEED_STAGE_TRAINING,
    seed_pb2.SEED_STAGE_BLENDING, seed_pb2.SEED_STAGE_HOLDING,
})


# ----- the behaviour policy -----


class ExploringPolicy(Policy):
    """`base`'s decisions, replaced with probability `epsilon` by one random legal action.

    The draw is a stable hash of (seed, run, epoch), so a retried boundary explores the
    same way. Exploratory decisions carry `policy="explore"`.
    """

    def __init__(self, base: Policy, *, epsilon: float, seed: int = 0) -> None:
        if not (isinstance(epsilon, int | float) and 0.0 <= epsilon <= 1.0):
            raise ConfigError(f"epsilon={epsilon!r} must be a number in [0, 1]")
        self.base = base
        self.epsilon = float(epsilon)
        self.seed = seed
        self.name = f"{base.name}+explore"
        self.uses_probes = base.uses_probes

    def settings(self) -> dict[str, str]:
        return {**self.base.settings(), "epsilon": str(self.epsilon)}

    def decide(self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates) -> list[decision_pb2.Decision]:
        # The base runs every boundary so its per-run history stays complete.
        decisions = self.base.decide(snapshot, candidates)
        key = f"{self.seed}:{snapshot.run_id}:{snapshot.epoch}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        if rng.random() >= self.epsilon:
            return decisions
        return [random_legal_decision(snapshot, candidates, rng)]


def random_legal_decision(
    snapshot: health_pb2.HealthSnapshot, candidates: Candidates, rng: random.Random
) -> decision_pb2.Decision:
    """One uniformly drawn (slot, legal action) pair, WAIT included, as an exploratory decision."""
    options: list[tuple[str, str, KernelCandidate | None]] = [("", "wait", None)]
    for s in snapshot.slots:
        for a in sorted(legal_actions(s.stage)):
            if a == GERMINATE:
                if s.embargo_epochs_left > 0 or snapshot.seeds_left <= 0:
                    continue
                options += [(s.slot_id, a, k) for k in affordable(snapshot, candidates.get(s.slot_id, ()))]
            else:
                options.append((s.slot_id, a, None))
    slot_id, action, kernel = options[rng.randrange(len(options))]
    if action == "wait":
        return decision_pb2.Decision(kind=decision_pb2.DECISION_KIND_WAIT, policy=EXPLORE, confidence=1.0,
                                     reason=f"exploration: wait (1 of {len(options)} legal options)")
    d = decision_pb2.Decision(kind=_ACTION_KIND[action], slot_id=slot_id, policy=EXPLORE, confidence=1.0,
                              reason=f"exploration: {action} {slot_id} (1 of {len(options)} legal options)")
    if kernel is not None:
        d.kernel_id, d.blueprint_id = kernel.kernel_id, kernel.blueprint_id
        d.reason += f" with {kernel.label}"
    return d


# ----- records -----


@dataclass(kw_only=True)
class BoundaryRecord:
    """One epoch boundary: what the controller saw and what was done."""

    snapshot: health_pb2.HealthSnapshot
    candidates: dict[str, list[KernelCandidate]]
    """Kernels on offer at each DORMANT slot (as the policy was offered them)."""
    decisions: list[decision_pb2.Decision]
    rejected: dict[int, str] = field(default_factory=dict)
    """Index into `decisions` → why Tolaria could not apply it."""

    @property
    def explored(self) -> bool:
        return any(d.policy == EXPLORE for d in self.decisions)


@dataclass(kw_only=True)
class SeedOutcome:
    """How one seed ended (the run's own field report for it)."""

    slot_id: str
    kernel_id: str
    germinated_epoch: int
    ended_epoch: int
    fate: str
    """"fossilized", "pruned", "rolled_back" or "run_ended" (still live at the end)."""
    contribution: float
    """Last measured counterfactual contribution while it was live (0: never measured)."""
    parameters: int
    """Parameters the seed added (from the snapshots; 0 if none saw it)."""
    rejected_by_gate: bool = False
    """A Kasmina gate failed for this seed."""
    slot_kind: str = "output"
    """"output" (the seed read the site's output) or "parallel" (the wrapped module's
    input), from the slot's site signature in the snapshots."""


@dataclass(kw_only=True)
class RunReport:
    run_id: str
    task: str
    total_epochs: int
    boundaries: list[BoundaryRecord]
    seeds: list[SeedOutcome]
    final_val_accuracy: float
    """Validation accuracy after the last epoch (the test split stays for benchmarks)."""
    host_parameters: int
    baseline_val_accuracy: float | None = None
    """Final validation accuracy of the same task and seed without growth (None: unknown)."""
    rollbacks: int = 0


CandidatesFor = Callable[[seed_pb2.SiteSignature], list[KernelCandidate]]


def slot_kind_name(site: seed_pb2.SiteSignature) -> str:
    """"parallel" or "output" for a site signature."""
    return "parallel" if site.kind == seed_pb2.SLOT_KIND_PARALLEL else "output"


def reports_from_events(
    events: Iterable[events_pb2.EventEnvelope],
    candidates_for: CandidatesFor,
    *,
    baselines: Mapping[str, float] | None = None,
) -> list[RunReport]:
    """Run reports from Tolaria's events (any order; duplicates by event_id dropped).

    A `health` event is a boundary's snapshot and the `decision` event of the same run and
    epoch is what was decided there; lifecycle transitions give each seed's fate; a failed
    `gate` marks its seed; a governor `degradation` marks the seeds it pruned as rolled
    back. Runs with no health event (never controlled) give no report.

    Args:
        candidates_for: the kernels on offer for a site (events do not carry them).
        baselines: run_id → final validation accuracy of its static baseline.
    """
    by_run: dict[str, list[events_pb2.EventEnvelope]] = {}
    seen: set[str] = set()
    for e in events:
        if e.event_id and e.event_id in seen:
            continue
        seen.add(e.event_id)
        by_run.setdefault(e.run_id, []).append(e)
    reports = []
    for run_id, evs in sorted(by_run.items()):
        evs.sort(key=lambda e: e.sequence)
        r = _report(run_id, evs, candidates_for)
        if r is not None:
            r.baseline_val_accuracy = (baselines or {}).get(run_id)
            reports.append(r)
    return reports


def _report(run_id: str, evs: list[events_pb2.EventEnvelope], candidates_for: CandidatesFor) -> RunReport | None:
    snaps = [e.health for e in evs if e.WhichOneof("payload") == "health"]
    if not snaps:
        return None
    decisions = {e.epoch: e.decision for e in evs if e.WhichOneof("payload") == "decision"}
    boundaries = []
    for snap in snaps:
        cands = {s.slot_id: list(candidates_for(s.site)) for s in snap.slots if s.stage == seed_pb2.SEED_STAGE_DORMANT}
        d = decisions.get(snap.epoch)
        boundaries.append(BoundaryRecord(
            snapshot=snap, candidates=cands,
            decisions=list(d.decisions) if d is not None else [],
            rejected=dict(d.rejected) if d is not None else {},
        ))
    live: dict[str, SeedOutcome] = {}
    ended: list[SeedOutcome] = []
    rollbacks = 0
    metrics = [e.epoch_metrics for e in evs if e.WhichOneof("payload") == "epoch_metrics"]
    for e in evs:
        kind = e.WhichOneof("payload")
        if kind == "lifecycle":
            lc = e.lifecycle
            if lc.to_stage == seed_pb2.SEED_STAGE_GERMINATED:
                live[lc.slot_id] = SeedOutcome(slot_id=lc.slot_id, kernel_id=lc.kernel_id, germinated_epoch=e.epoch,
                                               ended_epoch=e.epoch, fate="run_ended", contribution=0.0, parameters=0)
            elif lc.slot_id in live and lc.to_stage in (seed_pb2.SEED_STAGE_FOSSILIZED, seed_pb2.SEED_STAGE_PRUNED):
                o = live.pop(lc.slot_id)
                o.ended_epoch = e.epoch
                if lc.to_stage == seed_pb2.SEED_STAGE_FOSSILIZED:
                    o.fate = "fossilized"
                else:
                    o.fate = "rolled_back" if "governor rollback" in lc.reason else "pruned"
                ended.append(o)
        elif kind == "gate" and not e.gate.passed and e.gate.slot_id in live:
            live[e.gate.slot_id].rejected_by_gate = True
        elif kind == "health":
            for s in e.health.slots:
                o = live.get(s.slot_id)
                if o is not None and s.stage in _LIVE:
                    o.parameters = max(o.parameters, int(s.seed_parameters))
                    o.slot_kind = slot_kind_name(s.site)
                    if s.contribution_measured and math.isfinite(s.contribution):
                        o.contribution = float(s.contribution)
        elif kind == "degradation" and e.degradation.component == "governor" and e.degradation.kind == "rollback":
            rollbacks += 1
    last_epoch = max((e.epoch for e in evs), default=0)
    for o in live.values():
        o.ended_epoch = last_epoch
        ended.append(o)
    final = snaps[-1]
    final_acc = metrics[-1].val_accuracy if metrics else (final.val_accuracy_history[-1] if final.val_accuracy_history else 0.0)
    return RunReport(
        run_id=run_id, task=final.task, total_epochs=int(final.total_epochs), boundaries=boundaries,
        seeds=sorted(ended, key=lambda o: (o.germinated_epoch, o.slot_id)), final_val_accuracy=float(final_acc),
        host_parameters=int(final.host_parameters), rollbacks=rollbacks,
    )


# ----- rewards -----


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    """How a run's outcome becomes a return per boundary (docs/LEARNED_CONTROL.md)."""

    contribution_scale: float = 0.05
    """Contribution (validation-loss units) worth 1 reward unit, squashed by tanh."""
    accuracy_weight: float = 10.0
    """Reward per unit of final validation accuracy above the run's static baseline (0.1 = 10 points → 1.0)."""
    parameter_rent: float = 0.5
    """λ: reward lost per host-sized parameter count a seed adds, pro rata of the run it lived."""
    gate_penalty: float = 0.5
    """Extra penalty for creating a seed a gate rejected or the governor rolled back."""

    def __post_init__(self) -> None:
        for name in ("contribution_scale", "accuracy_weight", "parameter_rent", "gate_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")
        if self.contribution_scale == 0:
            raise ValueError("contribution_scale=0 must be > 0 (it divides the contribution)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RewardConfig:
        return from_dict(cls, data, what="tamiyo.reward key(s)", path="tamiyo.reward")


@dataclass(kw_only=True)
class SlotReward:
    slot_id: str
    action: str
    reward: float
    unsafe: bool = False
    """The seed this action created was rejected by a gate or rolled back."""


def boundary_rewards(report: RunReport, config: RewardConfig | None = None) -> list[tuple[float, list[SlotReward]]]:
    """Per boundary: (return, per-slot rewards of the actions taken there).

    Per applied action at slot s:
      germinate → tanh(c/scale) − λ · params/host · (epochs alive / total epochs)
                  − gate_penalty if the seed was rejected by a gate or rolled back,
                  c = the seed's last measured contribution;
      prune     → −tanh(c/scale) with c the pruned seed's last contribution (the loss it
                  avoided: positive when the seed was hurting) + the rent it stops paying;
      fossilize → tanh(c/scale) at fossilization.
    The boundary's return is the sum over its actions plus the run-level term
    accuracy_weight × (final validation accuracy − static baseline's), which every
    boundary of the run shares (0 when the baseline is unknown). A rejected decision
    earns nothing (it did not happen).
    """
    cfg = config or RewardConfig()
    total = max(report.total_epochs, 1)
    host = max(report.host_parameters, 1)
    run_term = 0.0
    if report.baseline_val_accuracy is not None:
        run_term = cfg.accuracy_weight * (report.final_val_accuracy - report.baseline_val_accuracy)
    seeds_by_start = {(o.slot_id, o.germinated_epoch): o for o in report.seeds}
    out = []
    for b in report.boundaries:
        epoch = b.snapshot.epoch
        slots = {s.slot_id: s for s in b.snapshot.slots}
        rewards: list[SlotReward] = []
        for i, d in enumerate(b.decisions):
            if i in b.rejected or d.kind == decision_pb2.DECISION_KIND_WAIT:
                continue
            s = slots.get(d.slot_id)
            if d.kind == decision_pb2.DECISION_KIND_GERMINATE:
                o = seeds_by_start.get((d.slot_id, epoch))
                if o is None:
                    continue
                alive = max(o.ended_epoch - o.germinated_epoch, 0) / total
                unsafe = o.rejected_by_gate or o.fate == "rolled_back"
                r = (math.tanh(o.contribution / cfg.contribution_scale)
                     - cfg.parameter_rent * o.parameters / host * alive
                     - (cfg.gate_penalty if unsafe else 0.0))
                rewards.append(SlotReward(slot_id=d.slot_id, action=GERMINATE, reward=r, unsafe=unsafe))
            elif d.kind == decision_pb2.DECISION_KIND_PRUNE and s is not None:
                c = s.contribution if s.contribution_measured and math.isfinite(s.contribution) else 0.0
                saved = cfg.parameter_rent * s.seed_parameters / host * max(total - epoch, 0) / total
                rewards.append(SlotReward(slot_id=d.slot_id, action=PRUNE,
                                          reward=-math.tanh(c / cfg.contribution_scale) + saved))
            elif d.kind == decision_pb2.DECISION_KIND_FOSSILIZE and s is not None:
                c = s.contribution if math.isfinite(s.contribution) else 0.0
                rewards.append(SlotReward(slot_id=d.slot_id, action=FOSSILIZE,
                                          reward=math.tanh(c / cfg.contribution_scale)))
        out.append((run_term + sum(r.reward for r in rewards), rewards))
    return out


# ----- sources -----


def read_jetstream(
    url: str,
    candidates_for: CandidatesFor,
    *,
    durable: str = "tamiyo-field-reports",
    timeout_s: float = 2.0,
    baselines: Mapping[str, float] | None = None,
) -> list[RunReport]:
    """Run reports from everything on the bus: Tolaria's run events (ESPER_EVENTS) and its
    health snapshots (ESPER_TELEMETRY), drained through one durable consumer per stream
    (`esper.oona.drain`; a durable resumes where it stopped, so a second read with the same
    `durable` sees only newer events).

    Raises:
        UnavailableError (from the consumer): JetStream cannot be reached.
    """
    from esper.oona.consumer import drain
    from esper.oona.subjects import EVENTS_PREFIX, EVENTS_STREAM, TELEMETRY_PREFIX, TELEMETRY_STREAM

    events: list[events_pb2.EventEnvelope] = []
    for stream, prefix in ((EVENTS_STREAM, EVENTS_PREFIX), (TELEMETRY_STREAM, TELEMETRY_PREFIX)):
        events += drain(url, f"{prefix}.>", f"{durable}-{stream.name.lower()}", timeout_s, stream=stream.name)
    return reports_from_events(events, candidates_for, baselines=baselines)


class UrzaCandidates:
    """`candidates_for` over Urza `QueryKernels`: the kernels compiled for a site with their
    field-report statistics (outcomes, fossilized, mean contribution), cached per site."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout_s: float = 5.0, limit: int = 100) -> None:
        from esper.urza.client import UrzaClient

        self.client = UrzaClient(target, api_key=api_key)
        self.timeout_s = timeout_s
        self.limit = limit
        self._cache: dict[bytes, list[KernelCandidate]] = {}

    def __call__(self, site: seed_pb2.SiteSignature) -> list[KernelCandidate]:
        key = site.SerializeToString(deterministic=True)
        if key not in self._cache:
            records, _ = self.client.query_kernels(self.timeout_s, site=site, page_size=self.limit)
            self._cache[key] = [KernelCandidate.from_record(r) for r in records]
        return list(self._cache[key])

    def close(self) -> None:
        self.client.close()
