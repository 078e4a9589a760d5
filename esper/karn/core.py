"""Karn's core: ProposeBlueprints over Urza's records, the `Evolver` and Tezzeret.

One ProposeBlueprints call:
1. reads the library from Urza: blueprints for the site's layout and the kernels compiled
   for the site, whose KernelStats (field reports) score them;
2. asks the `Evolver` for children; each is pre-flighted (`esper.karn.evolve.preflight`:
   IR validation, then the checks Tezzeret makes before signing, from
   `esper.blueprints.check`) and a child that fails is answered with accepted=false and
   the reason, and is never sent anywhere;
3. sends each child that passed to Tezzeret `Compile(inline blueprint, wait=true)`, which
   validates again (`compile_kernel`), signs, and only then publishes blueprint and kernel
   to Urza.

Pre-flight runs the same checks Tezzeret does, so a child that reaches Tezzeret normally
compiles; it saves a compile call per failing child and gives the reason in Karn's own
words. It is not what keeps failing children out of Urza: Tezzeret stores an inline
blueprint only after `compile_kernel` passed. A child that passed pre-flight but that
Tezzeret refuses (INVALID_ARGUMENT / FAILED_PRECONDITION), whose job FAILED, or that is
still compiling at the deadline is answered accepted=false with a `tezzeret: ...` reason,
and the call goes on with the next child; Tezzeret being unavailable fails the whole call
(it says nothing about the child).

Responses are kept by request_id (`RequestStore`, `<data_dir>/karn/requests.sqlite`): a
retry gets the first answer without proposing (or compiling) again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from esper import localdb
from esper.blueprints import plan_ir, site_key, supports
from esper.blueprints.ir import check_site
from esper.errors import DeadlineExceededError, FailedPreconditionError, InvalidArgumentError
from esper.karn.config import KarnConfig
from esper.karn.evolve import Evolver, Operator, Scored, derive_seed
from esper.tezzeret.client import TezzeretClient
from esper.urza.client import UrzaLibrary
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tz

log = logging.getLogger(__name__)


Compile = Callable[[blueprint_pb2.Blueprint, seed_pb2.SiteSignature, float],
                   Awaitable[tz.CompileJob]]
"""async (blueprint, site, timeout_s) -> Tezzeret's CompileJob; raises EsperError."""


class RequestStore:
    """Answers by request_id, so a retried ProposeBlueprints returns the first answer."""

    def __init__(self, path: Path) -> None:
        self._db = localdb.connect(path, synchronous="FULL")
        self._lock = threading.Lock()
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, "
                         "fingerprint TEXT NOT NULL, response BLOB NOT NULL)")

    def get(self, request_id: str, fingerprint: str) -> pb.ProposeBlueprintsResponse | None:
        with self._lock:
            row = self._db.execute("SELECT fingerprint, response FROM requests WHERE "
                                   "request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        if row[0] != fingerprint:
            raise InvalidArgumentError(
                f"request_id {request_id!r} was already used for a different "
                "ProposeBlueprints request (count, site or seed differ); use a new request_id",
                field="request_id")
        return pb.ProposeBlueprintsResponse.FromString(row[1])

    def put(self, request_id: str, fingerprint: str, resp: pb.ProposeBlueprintsResponse) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO requests VALUES (?, ?, ?)",
                             (request_id, fingerprint, resp.SerializeToString(deterministic=True)))

    def close(self) -> None:
        self._db.close()


class KarnCore:
    """ProposeBlueprints without gRPC: Urza and Tezzeret are injected."""

    def __init__(self, urza: Callable[[], UrzaLibrary], compile: Compile, config: KarnConfig,
                 store: RequestStore | None = None,
                 mutations: Mapping[str, Operator] | None = None) -> None:
        self._urza_factory = urza
        self._urza: UrzaLibrary | None = None
        self.compile = compile
        self.config = config
        self.store = store
        self.evolver = (Evolver(config=config.evolve) if mutations is None
                        else Evolver(config=config.evolve, mutations=dict(mutations)))
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def urza(self) -> UrzaLibrary:
        if self._urza is None:
            self._urza = self._urza_factory()
        return self._urza

    def close(self) -> None:
        """Close the Urza client, if one was made (the request store is the caller's)."""
        close = getattr(self._urza, "close", None)
        if close is not None:
            close()

    async def pool(self, site: seed_pb2.SiteSignature, deadline: float
                   ) -> tuple[list[Scored], set[str]]:
        """Blueprints that support `site`, scored by their kernels' field reports there,
        and the ids of every blueprint of the site's layout."""
        bps: list[blueprint_pb2.Blueprint] = []
        token = ""
        while True:
            page, token = await asyncio.to_thread(self.urza.list_blueprints, self._left(deadline),
                                                  layout=site.layout, page_size=500,
                                                  page_token=token)
            bps += page
            if not token:
                break
        records: dict[str, kernel_pb2.KernelRecord] = {}
        token = ""
        while True:
            page, token = await asyncio.to_thread(self.urza.query_kernels, self._left(deadline),
                                                  site=site, page_size=500, page_token=token)
            for r in page:
                if r.manifest.site == site:
                    records.setdefault(r.manifest.blueprint_id, r)
            if not token:
                break
        pool = []
        for bp in bps:
            if not supports(bp, site):
                continue
            rec = records.get(bp.blueprint_id)
            if rec is not None:
                stats = rec.stats
                score = self.evolver.score_of(stats.mean_contribution, stats.mean_accuracy_delta)
                pool.append(Scored(bp, score, float(rec.manifest.profile.parameters),
                                   stats.outcomes))
            else:
                pool.append(Scored(bp, 0.0, float(plan_ir(bp.ir, site).parameter_count), 0))
        return pool, {bp.blueprint_id for bp in bps}

    def _left(self, deadline: float, cap: float | None = None) -> float:
        left = deadline - time.monotonic()
        if left <= 0.05:
            raise DeadlineExceededError("ProposeBlueprints: the caller's deadline ran out")
        return min(left, cap if cap is not None else self.config.urza_timeout_s)

    async def propose(self, request: pb.ProposeBlueprintsRequest, time_left: float | None
                      ) -> pb.ProposeBlueprintsResponse:
        check_site(request.site)
        if not 1 <= request.count <= 64:
            raise InvalidArgumentError(f"count={request.count}: must be in [1, 64]",
                                       field="count")
        if not request.request_id:
            return await self._propose(request, time_left)
        fp = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        lock = self._locks.setdefault(request.request_id, asyncio.Lock())
        async with lock:
            if self.store is not None:
                done = await asyncio.to_thread(self.store.get, request.request_id, fp)
                if done is not None:
                    return done
            resp = await self._propose(request, time_left)
            if self.store is not None:
                await asyncio.to_thread(self.store.put, request.request_id, fp, resp)
        return resp

    async def _propose(self, request: pb.ProposeBlueprintsRequest, time_left: float | None
                       ) -> pb.ProposeBlueprintsResponse:
        deadline = time.monotonic() + (time_left if time_left is not None
                                       else self.config.default_timeout_s)
        site = request.site
        seed = request.seed or (derive_seed("karn", request.request_id) if request.request_id
                                else secrets.randbits(63))
        pool, known = await self.pool(site, deadline)
        if not pool:
            raise FailedPreconditionError(
                f"Urza holds no blueprint that supports site {site_key(site)}; Karn needs "
                "parents (register or compile the catalog first)")
        candidates = await asyncio.to_thread(self.evolver.propose, pool, site, request.count,
                                             seed, known_ids=known)
        resp = pb.ProposeBlueprintsResponse()
        for c in candidates:
            p = resp.proposals.add(blueprint=c.blueprint, operator=c.operator)
            if not c.ok:
                p.rejection = f"pre-flight: {c.rejection}"
                log.info("karn: rejected %s (%s): %s", c.blueprint.name, c.operator, c.rejection)
                continue
            try:
                job = await self.compile(c.blueprint, site,
                                         self._left(deadline, self.config.compile_timeout_s))
            except (InvalidArgumentError, FailedPreconditionError) as e:
                p.rejection = f"tezzeret: {type(e).__name__}: {e}"
                log.warning("karn: Tezzeret refused %s after pre-flight passed: %s",
                            c.blueprint.name, e)
                continue
            if job.state == tz.COMPILE_JOB_STATE_SUCCEEDED:
                p.accepted = True
                p.kernel_id = job.kernel_id
                p.blueprint.blueprint_id = job.blueprint_id
            elif job.state == tz.COMPILE_JOB_STATE_FAILED:
                p.rejection = f"tezzeret: {job.error}"
            else:
                p.rejection = (f"tezzeret: job {job.job_id} still "
                               f"{tz.CompileJobState.Name(job.state)} at the deadline")
        log.info("karn: %d proposals at %s (seed %d): %d accepted", len(resp.proposals),
                 site_key(site), seed, sum(p.accepted for p in resp.proposals))
        return resp


def tezzeret_compiler(tezzeret: TezzeretClient) -> Compile:
    """`compile` through Tezzeret's client: Compile(inline blueprint, wait=True), run on a
    thread so the event loop goes on (the deadline and trace context go with it)."""

    async def compile(bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature,
                      timeout_s: float) -> tz.CompileJob:
        return await asyncio.to_thread(tezzeret.compile, bp, site, timeout_s, wait=True)

    return compile


__all__ = ["Compile", "KarnCore", "RequestStore", "tezzeret_compiler"]
