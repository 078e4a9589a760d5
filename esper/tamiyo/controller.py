"""Tamiyo's core: one Decide within the caller's deadline, whatever Urza is doing.

The controller gathers kernel candidates per dormant slot (the caller's own, when it sends
them; else from a TTL cache, else from Urza within the time left), runs the policy,
withholds any decision the rules refuse
(`esper.tamiyo.policy.check_decisions`) and remembers recent responses by request_id.

Urza being slow or down never fails a Decide: the policy then sees no candidates for the
slots Urza could not answer for (so it cannot germinate there), and the reply's WAIT says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from esper.errors import DeadlineExceededError, EsperError, InvalidArgumentError
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.policy import (
    KernelCandidate,
    Policy,
    check_decisions,
    finish_decisions,
    withheld_note,
)
from generated.esper.common.v1 import decision_pb2, health_pb2, seed_pb2

log = logging.getLogger(__name__)


class CandidateSource(Protocol):
    """Where kernels for a site come from (Urza over gRPC in the service)."""

    async def query(
        self, site: seed_pb2.SiteSignature, *, max_parameters: int, limit: int, timeout_s: float
    ) -> list[KernelCandidate]:
        """Kernels compiled for `site` with at most `max_parameters`, best outcomes first.

        Raises an `EsperError` (e.g. `UnavailableError`) when the source cannot answer.
        """
        ...


@dataclass
class _Entry:
    fetched_at: float
    max_parameters: int
    kernels: list[KernelCandidate]


class CandidateCache:
    """Kernel lists per site. An entry fetched under a parameter bound answers any smaller bound."""

    def __init__(self, ttl_s: float, *, max_sites: int = 4096) -> None:
        self.ttl_s = ttl_s
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._max_sites = max_sites

    @staticmethod
    def key(site: seed_pb2.SiteSignature) -> bytes:
        return site.SerializeToString(deterministic=True)

    def get(self, site: seed_pb2.SiteSignature, max_parameters: int, now: float, *, stale_ok: bool) -> _Entry | None:
        e = self._entries.get(self.key(site))
        if e is None or e.max_parameters < max_parameters:
            return None
        if not stale_ok and now - e.fetched_at > self.ttl_s:
            return None
        return e

    def put(self, site: seed_pb2.SiteSignature, max_parameters: int, kernels: list[KernelCandidate], now: float) -> None:
        k = self.key(site)
        self._entries[k] = _Entry(fetched_at=now, max_parameters=max_parameters, kernels=kernels)
        self._entries.move_to_end(k)
        while len(self._entries) > self._max_sites:
            self._entries.popitem(last=False)


@dataclass(kw_only=True)
class DecideResult:
    decisions: list[decision_pb2.Decision]
    policy: str
    policy_version: str
    latency_ms: float
    notes: list[str] = field(default_factory=list)
    """What limited this decision (Urza unavailable, stale candidates, withheld decisions)."""


class TamiyoController:
    """Health snapshot in, legal decisions out, within a deadline."""

    def __init__(self, policy: Policy, source: CandidateSource | None, config: TamiyoConfig) -> None:
        self.policy = policy
        self.source = source
        self.config = config
        self.cache = CandidateCache(config.candidate_ttl_s)
        self._urza_down_until = 0.0
        self._urza_last_error = ""
        self._responses: OrderedDict[str, tuple[bytes, DecideResult]] = OrderedDict()
        self._in_flight: dict[str, tuple[bytes, asyncio.Future[DecideResult]]] = {}
        self.loaded_at = time.time()
        self.reload_error = ""
        """Why the last hot reload was refused (empty: none failed since the last success)."""
        self.decisions_served = 0
        self.urza_failures = 0

    def swap_policy(self, policy: Policy) -> None:
        """Serve `policy` from the next Decide on (called between Decides on the event loop)."""
        self.policy = policy
        self.loaded_at = time.time()
        self.reload_error = ""

    async def decide(
        self,
        snapshot: health_pb2.HealthSnapshot,
        *,
        request_id: str = "",
        allowed_blueprints: Sequence[str] = (),
        time_remaining_s: float | None = None,
        candidates: Mapping[str, Sequence[KernelCandidate]] | None = None,
    ) -> DecideResult:
        """Decisions for one boundary; the same request_id (and request) gives the same result.

        `candidates`: the caller's own kernels per slot (None: ask Urza). Slots left out
        have none; the same budget and `allowed_blueprints` filters apply.

        Raises:
            InvalidArgumentError: duplicate slot ids, or a request_id reused for another request.
            DeadlineExceededError: less time left than `decide_reserve_s`.
        """
        start = time.monotonic()
        budget = self.config.default_deadline_s if time_remaining_s is None else time_remaining_s
        deadline = start + budget
        if budget <= self.config.decide_reserve_s:
            raise DeadlineExceededError(
                f"{budget * 1e3:.2f} ms left of the caller's deadline; a decision needs at least "
                f"decide_reserve_s={self.config.decide_reserve_s * 1e3:.2f} ms"
            )
        if not request_id:
            return await self._decide(snapshot, allowed_blueprints, start, deadline, candidates)
        fingerprint = _fingerprint(snapshot, allowed_blueprints, candidates)
        seen = self._responses.get(request_id)
        if seen is not None:
            self._check_same(request_id, seen[0], fingerprint)
            self._responses.move_to_end(request_id)
            return seen[1]
        entry = self._in_flight.get(request_id)
        if entry is not None:
            self._check_same(request_id, entry[0], fingerprint)
            pending = entry[1]
            try:
                # A retry that arrives while the first attempt still runs waits for its answer.
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this call itself was cancelled
                # The first attempt was abandoned (its caller went away): decide here instead.
        fut: asyncio.Future[DecideResult] = asyncio.get_running_loop().create_future()
        self._in_flight[request_id] = (fingerprint, fut)
        try:
            result = await self._decide(snapshot, allowed_blueprints, start, deadline, candidates)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved here so an unawaited future does not log it again
            raise
        finally:
            if self._in_flight.get(request_id, (None, None))[1] is fut:
                del self._in_flight[request_id]
        self._responses[request_id] = (fingerprint, result)
        while len(self._responses) > self.config.idempotency_cache_size:
            self._responses.popitem(last=False)
        fut.set_result(result)
        return result

    @staticmethod
    def _check_same(request_id: str, seen: bytes, fingerprint: bytes) -> None:
        if seen != fingerprint:
            raise InvalidArgumentError(
                f"request_id {request_id!r} was already used for a different snapshot; "
                "use a new request_id for a new request",
                field="request_id",
            )

    async def _decide(
        self,
        snapshot: health_pb2.HealthSnapshot,
        allowed_blueprints: Sequence[str],
        start: float,
        deadline: float,
        offered: Mapping[str, Sequence[KernelCandidate]] | None = None,
    ) -> DecideResult:
        ids = [s.slot_id for s in snapshot.slots]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidArgumentError(f"snapshot.slots repeats slot id(s) {dup}", field="snapshot.slots")
        if offered is not None:
            candidates, notes = self._callers_candidates(snapshot, allowed_blueprints, offered), []
        else:
            candidates, notes = await self._candidates(snapshot, allowed_blueprints, deadline)
        proposed = self.policy.decide(snapshot, candidates)
        decisions, withheld = check_decisions(snapshot, proposed, candidates)
        for w in withheld:
            log.error(
                "policy %s proposed a decision the rules refuse (withheld): %s — %s",
                self.policy.name,
                decision_pb2.DecisionKind.Name(w.decision.kind),
                w.why,
            )
            notes.append(withheld_note(w))
        acted = [d for d in decisions if d.kind != decision_pb2.DECISION_KIND_WAIT]
        finish_decisions(decisions, notes, policy=self.policy.name)
        self.decisions_served += len(acted)
        return DecideResult(
            decisions=decisions,
            policy=self.policy.name,
            policy_version=self.policy.version,
            latency_ms=(time.monotonic() - start) * 1e3,
            notes=notes,
        )

    @staticmethod
    def _open_slots(snapshot: health_pb2.HealthSnapshot) -> list[health_pb2.SlotHealth]:
        """Slots a germination could use now: DORMANT, not embargoed, budget left."""
        if snapshot.seeds_left == 0 or snapshot.parameters_left == 0:
            return []
        return [
            s
            for s in snapshot.slots
            if s.stage == seed_pb2.SEED_STAGE_DORMANT and s.embargo_epochs_left == 0 and s.HasField("site")
        ]

    def _callers_candidates(
        self,
        snapshot: health_pb2.HealthSnapshot,
        allowed: Sequence[str],
        offered: Mapping[str, Sequence[KernelCandidate]],
    ) -> dict[str, list[KernelCandidate]]:
        """The caller's kernels for its open slots, under the same filters as Urza's."""
        bound = snapshot.parameters_left
        allow = set(allowed)
        return {
            s.slot_id: [c for c in offered[s.slot_id]
                        if c.parameters <= bound and (not allow or c.blueprint_id in allow)]
            for s in self._open_slots(snapshot)
            if s.slot_id in offered
        }

    async def _candidates(
        self, snapshot: health_pb2.HealthSnapshot, allowed: Sequence[str], deadline: float
    ) -> tuple[dict[str, list[KernelCandidate]], list[str]]:
        notes: list[str] = []
        # Only ask for kernels a germination could use: open dormant slots, budget left.
        slots = self._open_slots(snapshot)
        if not slots:
            return {}, notes
        bound = snapshot.parameters_left
        now = time.monotonic()
        by_site: dict[bytes, list[KernelCandidate] | None] = {}
        to_fetch: dict[bytes, seed_pb2.SiteSignature] = {}
        for s in slots:
            k = CandidateCache.key(s.site)
            if k in by_site or k in to_fetch:
                continue
            hit = self.cache.get(s.site, bound, now, stale_ok=False)
            if hit is not None:
                by_site[k] = hit.kernels
            else:
                to_fetch[k] = s.site
        if to_fetch:
            fetched = await self._fetch(to_fetch, bound, deadline, notes)
            by_site.update(fetched)
        allow = set(allowed)
        out: dict[str, list[KernelCandidate]] = {}
        for s in slots:
            kernels = by_site.get(CandidateCache.key(s.site))
            if kernels is None:
                continue
            out[s.slot_id] = [
                c for c in kernels if c.parameters <= bound and (not allow or c.blueprint_id in allow)
            ]
        return out, notes

    async def _fetch(
        self,
        sites: dict[bytes, seed_pb2.SiteSignature],
        bound: int,
        deadline: float,
        notes: list[str],
    ) -> dict[bytes, list[KernelCandidate] | None]:
        now = time.monotonic()
        timeout = min(self.config.urza_timeout_s, deadline - now - self.config.decide_reserve_s)
        why = ""
        if self.source is None:
            why = "no Urza endpoint is configured"
        elif now < self._urza_down_until:
            why = f"Urza failed {self._urza_last_error!r}; not asking again for {self._urza_down_until - now:.1f} s"
        elif timeout <= 0:
            why = "no time left in the caller's deadline to ask Urza"
        results: dict[bytes, list[KernelCandidate] | None] = {}
        if not why:
            assert self.source is not None
            keys = list(sites)
            outcomes = await asyncio.gather(
                *(self._query(sites[k], bound, timeout) for k in keys), return_exceptions=True
            )
            failures: list[str] = []
            fetched_at = time.monotonic()
            for k, o in zip(keys, outcomes, strict=True):
                if isinstance(o, BaseException):
                    if not isinstance(o, EsperError | TimeoutError):
                        raise o
                    failures.append(f"{type(o).__name__}: {o}" if str(o) else type(o).__name__)
                    continue
                self.cache.put(sites[k], bound, o, fetched_at)
                results[k] = o
            if failures:
                self.urza_failures += 1
                self._urza_last_error = failures[0]
                self._urza_down_until = fetched_at + self.config.urza_cooldown_s
                why = f"Urza did not answer within {timeout * 1e3:.0f} ms ({failures[0]})"
                log.warning("kernel candidates unavailable: %s", why)
        if why:
            stale = 0
            for k, site in sites.items():
                if k in results:
                    continue
                e = self.cache.get(site, bound, time.monotonic(), stale_ok=True)
                if e is not None:
                    results[k] = e.kernels
                    stale += 1
            missing = len(sites) - len(results)
            note = f"kernel candidates: {why}"
            if stale:
                note += f"; using cached kernels for {stale} site(s)"
            if missing:
                note += f"; no germination possible at {missing} site(s) without kernels"
            notes.append(note)
        return results

    async def _query(self, site: seed_pb2.SiteSignature, bound: int, timeout: float) -> list[KernelCandidate]:
        assert self.source is not None
        return await asyncio.wait_for(
            self.source.query(site, max_parameters=bound, limit=self.config.max_candidates, timeout_s=timeout),
            timeout,
        )


def _fingerprint(snapshot: health_pb2.HealthSnapshot, allowed: Sequence[str],
                 offered: Mapping[str, Sequence[KernelCandidate]] | None = None) -> bytes:
    h = hashlib.sha256(snapshot.SerializeToString(deterministic=True))
    for b in allowed:
        h.update(b"\0" + b.encode())
    if offered is not None:
        h.update(b"\1")
        for slot_id, kernels in offered.items():
            h.update(b"\2" + slot_id.encode())
            for c in kernels:
                h.update(b"\3" + repr(c).encode())
    return h.digest()
