"""The heuristic controller: rules a person can read, and the baseline a learned policy must beat.

At each epoch boundary, in this order:

1. **Prune** a live seed whose numbers are not finite, whose measured counterfactual
   contribution is below `-prune_threshold`, or that sat `holding_patience_epochs` in
   HOLDING without earning fossilization.
2. **Fossilize** a HOLDING seed whose measured contribution was at least
   `fossilize_threshold` for `fossilize_epochs` consecutive boundaries. The record is the
   snapshot's own (`HealthSnapshot.slot_records`) when the client sends it (`HealthSnapshot.
   slot_history`; `esper.grow` always does), so any replica of the service decides a
   boundary alike and a resumed run keeps its streaks; for clients that send none, the
   policy remembers boundaries itself, per run and slot, reset when the slot's kernel
   changes (one replica's memory: Decide must then reach the same replica every epoch).
3. **Germinate** at most one seed when validation loss has plateaued after the warm-up:
   the best loss in the last `plateau_window` epochs improved on the best loss before them
   by less than `plateau_threshold` (relative). Not while another seed is still
   GERMINATED/TRAINING/BLENDING (unless `one_seed_in_flight` is off), not without seeds or
   parameters left, never at an embargoed slot. Candidates come from both kinds of slot
   (output: the seed reads the site's output; parallel: it reads the wrapped module's
   input and can add width) in one decision:

   *With probes* (`HealthSnapshot.probes`: the client trained a fresh seed of each offered
   kernel alone for a few steps and measured its held-out gain and that gain's standard
   error, `esper.grow.probe`): *where and what* together, over every probed kernel of
   every open slot, whatever the slot's kind — measured gains are in one unit (validation
   loss), so the kinds compete on them. The pair with the best score wins, except that
   every pair within `probe_tie_stderr` standard errors of it counts as tied, and among
   tied pairs the kernel with the most parameters wins: the probe cannot tell them apart,
   its few steps underrate kernels that learn more slowly, and capacity is what a
   plateaued host lacks. This is the cold start: with no field reports the measurement,
   not the parameter rent, tells kernels apart. With `probe_min_gain` set, no germination
   unless the chosen kernel's gain is above it.

   *Without probes*, *where*: the open dormant slot whose host site had the largest
   gradient norm over the epoch (`SlotHealth.host_grad_norm`): the loss is still pulling
   hardest on that layer, so new capacity there receives the most learning signal; ties go
   to the deepest slot (or the earliest, by config). Gradient norms of the two kinds
   measure different things (a wrapped layer's parameter gradient, an activation's output
   gradient), so by default every open parallel slot ranks before every output slot
   (`slot_kinds`); *what*: the best-scoring kernel there. With neither probes nor field
   reports the score differs only by the parameter rent, so this falls back to the
   cheapest kernel: send probes (or outcome records) for a cold start that means something.

   The score = contribution shrunk towards a prior by the kernel's field-report count
   + `success_weight` × (Laplace-smoothed fossilization rate − ½)
   − `cost_weight` × kernel parameters / host parameters,
   where the prior is `probe_weight` × the kernel's probe gain when it was probed here,
   else `prior_contribution`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from esper.tamiyo._config import settings_in_words
from esper.tamiyo.heuristic.config import HeuristicConfig
from esper.tamiyo.history import ContributionHistory
from esper.tamiyo.policy import (
    Candidates,
    KernelCandidate,
    Policy,
    affordable,
    seeds_in_flight,
    slot_finite,
    stage_name,
    wait,
)
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2


def relative_improvement(history: Sequence[float], window: int) -> float | None:
    """(best before the window − best in the window) / |best before the window|; None if too short."""
    if len(history) < window + 1:
        return None
    before = min(history[:-window])
    recent = min(history[-window:])
    return (before - recent) / max(abs(before), 1e-12)


def kernel_score(c: KernelCandidate, *, host_parameters: int, config: HeuristicConfig,
                 probe_gain: float | None = None) -> float:
    """The kernel's score; `probe_gain` (measured at this slot) sets its prior when given."""
    n = c.outcomes
    prior = config.prior_contribution if probe_gain is None else config.probe_weight * probe_gain
    shrunk = (n * c.mean_contribution + config.prior_strength * prior) / max(
        n + config.prior_strength, 1e-12
    )
    success = (c.fossilized + 1) / (n + 2) - 0.5
    rent = c.parameters / max(host_parameters, 1)
    return shrunk + config.success_weight * success - config.cost_weight * rent


def rank_kernels(
    candidates: Sequence[KernelCandidate], *, host_parameters: int, config: HeuristicConfig
) -> list[KernelCandidate]:
    """Best first; ties go to the smaller kernel, then the kernel id (determinism)."""
    return sorted(
        candidates,
        key=lambda c: (-kernel_score(c, host_parameters=host_parameters, config=config), c.parameters, c.kernel_id),
    )


class HeuristicPolicy(Policy):
    name = "heuristic"

    def __init__(self, config: HeuristicConfig | None = None) -> None:
        self.config = config or HeuristicConfig()
        self.history = ContributionHistory()

    def settings(self) -> dict[str, str]:
        return settings_in_words(self.config)

    uses_probes = True

    def decide(
        self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates
    ) -> list[decision_pb2.Decision]:
        if not snapshot.slot_history:
            # A client that does not carry the run's history: remember it here.
            self.history.observe(snapshot)
        decisions: list[decision_pb2.Decision] = []
        removed: set[str] = set()
        for slot in sorted(snapshot.slots, key=lambda s: s.depth):
            d = self._keep_or_remove(snapshot, slot)
            if d is not None:
                decisions.append(d)
                if d.kind == decision_pb2.DECISION_KIND_PRUNE:
                    removed.add(slot.slot_id)
        germ, why_not = self._germination(snapshot, candidates, removed)
        if germ is not None:
            decisions.append(germ)
        if not decisions:
            decisions.append(wait(why_not, policy=self.name))
        return decisions

    def _keep_or_remove(
        self, snapshot: health_pb2.HealthSnapshot, slot: health_pb2.SlotHealth
    ) -> decision_pb2.Decision | None:
        cfg = self.config
        live = slot.stage in (
            seed_pb2.SEED_STAGE_GERMINATED,
            seed_pb2.SEED_STAGE_TRAINING,
            seed_pb2.SEED_STAGE_BLENDING,
            seed_pb2.SEED_STAGE_HOLDING,
        )
        if not live:
            return None
        stage = stage_name(slot.stage)
        if not slot_finite(slot):
            return self._decision(
                decision_pb2.DECISION_KIND_PRUNE,
                slot,
                f"prune {slot.slot_id}: its health numbers are not finite in {stage}",
            )
        if slot.contribution_measured and slot.contribution < -cfg.prune_threshold:
            return self._decision(
                decision_pb2.DECISION_KIND_PRUNE,
                slot,
                f"prune {slot.slot_id}: counterfactual contribution {slot.contribution:+.4g} is below "
                f"-{cfg.prune_threshold:g} in {stage} (removing the seed lowers validation loss)",
            )
        if slot.stage != seed_pb2.SEED_STAGE_HOLDING:
            return None
        streak = self._streak(snapshot, slot)
        if streak >= cfg.fossilize_epochs:
            return self._decision(
                decision_pb2.DECISION_KIND_FOSSILIZE,
                slot,
                f"fossilize {slot.slot_id}: contribution >= {cfg.fossilize_threshold:g} for {streak} "
                f"consecutive HOLDING epochs (now {slot.contribution:+.4g})",
            )
        if slot.epochs_in_stage >= cfg.holding_patience_epochs:
            return self._decision(
                decision_pb2.DECISION_KIND_PRUNE,
                slot,
                f"prune {slot.slot_id}: {slot.epochs_in_stage} epochs in HOLDING without "
                f"{cfg.fossilize_epochs} consecutive epochs of contribution >= {cfg.fossilize_threshold:g} "
                f"(now {slot.contribution:+.4g})",
            )
        return None

    def _streak(self, snapshot: health_pb2.HealthSnapshot, slot: health_pb2.SlotHealth) -> int:
        """Consecutive boundaries up to now in HOLDING with contribution >= the threshold."""
        cfg = self.config
        if not snapshot.slot_history:
            return self.history.streak(snapshot.run_id, slot.slot_id,
                                       stage=seed_pb2.SEED_STAGE_HOLDING,
                                       up_to_epoch=snapshot.epoch, at_least=cfg.fossilize_threshold)
        return history_streak(snapshot, slot, up_to_epoch=snapshot.epoch, stage=seed_pb2.SEED_STAGE_HOLDING,
                              at_least=cfg.fossilize_threshold)

    def _germination(
        self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates, removed: set[str]
    ) -> tuple[decision_pb2.Decision | None, str]:
        """The germination for this boundary, or None and why not (in words)."""
        cfg = self.config
        if snapshot.epoch < cfg.warmup_epochs:
            return None, f"warm-up: epoch {snapshot.epoch} < warmup_epochs={cfg.warmup_epochs}"
        history = list(snapshot.val_loss_history)
        if not all(math.isfinite(v) for v in history):
            return None, "validation loss history has non-finite values; not growing a diverging run"
        improvement = relative_improvement(history, cfg.plateau_window)
        if improvement is None:
            return None, (
                f"{len(history)} validation losses; a plateau needs at least {cfg.plateau_window + 1}"
            )
        if improvement >= cfg.plateau_threshold:
            return None, (
                f"no plateau: validation loss improved {improvement:.2%} over the last "
                f"{cfg.plateau_window} epochs (threshold {cfg.plateau_threshold:.2%})"
            )
        plateau_words = (
            f"validation loss plateaued ({improvement:.2%} better over the last {cfg.plateau_window} "
            f"epochs, threshold {cfg.plateau_threshold:.2%})"
        )
        if snapshot.seeds_left <= 0:
            return None, f"{plateau_words}, but no seeds are left in the growth budget"
        in_flight = [s for s in seeds_in_flight(snapshot) if s not in removed]
        if cfg.one_seed_in_flight and in_flight:
            return None, f"{plateau_words}, but seed(s) {in_flight} are still training or blending"
        dormant = [s for s in snapshot.slots if s.stage == seed_pb2.SEED_STAGE_DORMANT]
        if not dormant:
            return None, f"{plateau_words}, but no slot is DORMANT"
        open_slots = [s for s in dormant if s.embargo_epochs_left == 0]
        if not open_slots:
            return None, f"{plateau_words}, but every dormant slot is embargoed"
        probed = self._probed(snapshot, open_slots, candidates)
        if probed:
            return self._germinate_probed(snapshot, probed, plateau_words)
        sign = 1 if cfg.tie_break == "deepest" else -1
        ranked = sorted(open_slots, key=lambda s: (self._kind_rank(s), -s.host_grad_norm,
                                                   -sign * s.depth, s.slot_id))
        reasons: list[str] = []
        for slot in ranked:
            offered = list(candidates.get(slot.slot_id, ()))
            fitting = affordable(snapshot, offered)
            if not fitting:
                reasons.append(
                    f"{slot.slot_id}: {len(offered)} kernel(s) offered, none within "
                    f"{snapshot.parameters_left} parameters left"
                )
                continue
            best = rank_kernels(fitting, host_parameters=snapshot.host_parameters, config=cfg)[0]
            score = kernel_score(best, host_parameters=snapshot.host_parameters, config=cfg)
            runner_up = f" over {len(fitting) - 1} other kernel(s)" if len(fitting) > 1 else ""
            reason = (
                f"germinate {slot.slot_id} with {best.label}: {plateau_words}; this slot has the "
                f"largest host gradient norm among open dormant {_kind_words(self, slot)} "
                f"({slot.host_grad_norm:.4g}); kernel score {score:+.4g}{runner_up} (no probes)"
            )
            if reasons:
                reason += f" (skipped {'; '.join(reasons)})"
            d = self._decision(decision_pb2.DECISION_KIND_GERMINATE, slot, reason)
            d.blueprint_id = best.blueprint_id
            d.kernel_id = best.kernel_id
            return d, ""
        return None, f"{plateau_words}, but no kernel fits: {'; '.join(reasons)}"

    def _kind_rank(self, slot: health_pb2.SlotHealth) -> int:
        order = self.config.slot_kinds
        if order == "gradient":
            return 0
        parallel = slot.site.kind == seed_pb2.SLOT_KIND_PARALLEL
        return 0 if parallel == (order == "parallel_first") else 1

    @staticmethod
    def _probed(snapshot: health_pb2.HealthSnapshot, open_slots: Sequence[health_pb2.SlotHealth],
                candidates: Candidates
                ) -> list[tuple[health_pb2.SlotHealth, KernelCandidate, health_pb2.KernelProbe]]:
        """(slot, kernel, probe) for every affordable offered kernel a probe measured."""
        out = []
        by_slot: dict[str, dict[str, health_pb2.KernelProbe]] = {}
        for p in snapshot.probes:
            by_slot.setdefault(p.slot_id, {})[p.kernel_id] = p
        for slot in open_slots:
            probes = by_slot.get(slot.slot_id, {})
            if not probes:
                continue
            for c in affordable(snapshot, list(candidates.get(slot.slot_id, ()))):
                p = probes.get(c.kernel_id)
                if p is not None and math.isfinite(p.gain):
                    out.append((slot, c, p))
        return out

    def _germinate_probed(
        self, snapshot: health_pb2.HealthSnapshot,
        probed: list[tuple[health_pb2.SlotHealth, KernelCandidate, health_pb2.KernelProbe]],
        plateau_words: str,
    ) -> tuple[decision_pb2.Decision | None, str]:
        cfg = self.config
        sign = 1 if cfg.tie_break == "deepest" else -1

        def score(item: tuple) -> float:
            _, c, p = item
            return kernel_score(c, host_parameters=snapshot.host_parameters, config=cfg,
                                probe_gain=p.gain)

        def stderr(item: tuple) -> float:
            # The probe's part of the score: its gain, shrunk by the kernel's field reports.
            _, c, p = item
            return cfg.probe_weight * p.gain_stderr * cfg.prior_strength / max(
                c.outcomes + cfg.prior_strength, 1e-12)

        def order(it: tuple) -> tuple:
            # Best score; ties to the smaller kernel, then by the slot tie-break, then ids.
            return (-score(it), it[1].parameters, -sign * it[0].depth, it[0].slot_id,
                    it[1].kernel_id)

        top = min(probed, key=order)
        tied = [it for it in probed if score(top) - score(it)
                <= cfg.probe_tie_stderr * math.hypot(stderr(top), stderr(it))]
        slot, best, probe = min(tied, key=lambda it: (-it[1].parameters, *order(it)))
        slots = len({s.slot_id for s, _, _ in probed})
        measured = (f"probe gain {probe.gain:+.4g} ± {probe.gain_stderr:.2g} after {probe.steps} "
                    f"steps, score {score((slot, best, probe)):+.4g}; {len(probed)} probed "
                    f"kernel(s) at {slots} open slot(s)")
        if best is not top[1] or slot is not top[0]:
            measured += (f"; the best score was {top[1].label} at {top[0].slot_id} "
                         f"({score(top):+.4g}), within {cfg.probe_tie_stderr:g} standard "
                         f"error(s): {len(tied)} tied, the largest chosen")
        if cfg.probe_min_gain is not None and probe.gain <= cfg.probe_min_gain:
            return None, (f"{plateau_words}, but no probed kernel gains more than "
                          f"probe_min_gain={cfg.probe_min_gain:g} (best: {best.label} at "
                          f"{slot.slot_id}, {measured})")
        reason = (f"germinate {slot.slot_id} ({_kind_words(self, slot, plural=False)}) with "
                  f"{best.label}: {plateau_words}; {measured}")
        d = self._decision(decision_pb2.DECISION_KIND_GERMINATE, slot, reason)
        d.blueprint_id = best.blueprint_id
        d.kernel_id = best.kernel_id
        return d, ""

    def _decision(self, kind: int, slot: health_pb2.SlotHealth, reason: str) -> decision_pb2.Decision:
        return decision_pb2.Decision(
            kind=kind, slot_id=slot.slot_id, reason=reason, policy=self.name, confidence=1.0
        )


def _kind_words(policy: HeuristicPolicy, slot: health_pb2.SlotHealth, *, plural: bool = True) -> str:
    kind = "parallel" if slot.site.kind == seed_pb2.SLOT_KIND_PARALLEL else "output"
    if not plural:
        return f"{kind} slot"
    if policy.config.slot_kinds == "gradient":
        return "slots"
    return f"{kind} slots"


def history_streak(snapshot: health_pb2.HealthSnapshot, slot: health_pb2.SlotHealth, *,
                   up_to_epoch: int, stage: int, at_least: float) -> int:
    """Consecutive epochs ending at `up_to_epoch` in `stage` with a measured contribution
    >= `at_least`, read from the snapshot's records of the slot (`slot_records`)."""
    n, expect = 0, up_to_epoch
    for rec in reversed([r for r in snapshot.slot_records if r.slot_id == slot.slot_id]):
        if (rec.epoch != expect or rec.stage != stage or not rec.contribution_measured
                or not rec.contribution >= at_least):
            break
        n += 1
        expect -= 1
    return n
