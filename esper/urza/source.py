"""`UrzaKernels`: kernels from the platform for any site (a `KernelSource` over gRPC).

    kernels = UrzaKernels.connect("127.0.0.1:50051", api_key=key,
                                  trusted_keys_dir=".esper/trusted_keys",
                                  tezzeret="127.0.0.1:50051")
    kernels.candidates(site)       # Urza's kernels for the site, best outcomes first
    kernels.load(kernel_id, site)  # fetched, verified (Kasmina's KernelLoader), materialised

* Candidates come from `QueryKernels` (`KernelCandidate.from_record`).
* Modules come through Kasmina's verifying `KernelLoader` (signature, hashes, allowlisted
  ops, safetensors weights; memory and disk caches) fed by `esper.urza.client`.
* A site Urza holds no kernels for is compiled on demand: Tezzeret's `EnsureKernels`
  starts one job per catalog blueprint that supports the site, once (Tezzeret's job store
  makes it idempotent across runs and restarts; Urza caches the kernels for everyone after).
  Until they are stored, germination at that site is deferred, and `on_event(kind, detail)`
  says so: "compiling", then "recovered" (kernels ready), "compile_failed", "deferred"
  (still compiling when a wait ran out), "no_kernels" (no catalog blueprint fits the site,
  or no Tezzeret to ask) — Tolaria records them as `DegradationEvent(component="kernels")`.

Every remote failure is an `EsperError` (Urza's client: deadline, retries, breaker), which a
caller of a `KernelSource` treats as "no growth this boundary".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from esper.blueprints import site_key
from esper.blueprints.artifact import TrustedKeys
from esper.grow.protocols import KernelCandidate
from esper.kasmina.loader import KernelLoader
from esper.urza.client import UrzaClient, fetcher
from generated.esper.common.v1 import seed_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tz_pb

if TYPE_CHECKING:
    from esper.tezzeret.client import TezzeretClient

log = logging.getLogger(__name__)

OnEvent = Callable[[str, str], None]
"""(kind, detail) → e.g. a DegradationEvent(component="kernels")."""

_DONE = (tz_pb.COMPILE_JOB_STATE_SUCCEEDED, tz_pb.COMPILE_JOB_STATE_FAILED)


@dataclass
class _Site:
    """What this source knows of one site signature."""

    site: seed_pb2.SiteSignature
    state: str = "unknown"
    """"unknown" (not asked yet), "ready" (Urza has kernels), "compiling", "none"."""
    jobs: list[tz_pb.CompileJob] = field(default_factory=list)
    since: float = 0.0
    told_deferred: bool = False


class UrzaKernels:
    """Kernels for any site from Urza, compiled on demand by Tezzeret (see the module doc).

    Args:
        urza: the Urza client (its breaker and retries apply to every call).
        loader: Kasmina's verifying loader fetching through `urza`.
        tezzeret: where to ask for kernels Urza lacks; None: sites without kernels stay
            without (one "no_kernels" event says so).
        blueprints: catalog blueprint names to ask Tezzeret for; empty: its whole catalog.
        timeout_s: deadline of each Urza query and kernel load.
        compile_wait_s: how long `candidates` (and the first `wait_pending`) wait for an
            on-demand compile before deferring germination at the site.
        max_candidates: kernels asked of Urza per site.
        on_event: told what happens to sites without kernels (see the module doc).
    """

    def __init__(self, urza: UrzaClient, loader: KernelLoader, *,
                 tezzeret: TezzeretClient | None = None, blueprints: Sequence[str] = (),
                 timeout_s: float = 5.0, compile_wait_s: float = 60.0, max_candidates: int = 64,
                 on_event: OnEvent | None = None) -> None:
        self.urza = urza
        self.loader = loader
        self.tezzeret = tezzeret
        self.blueprints = tuple(blueprints)
        self.timeout_s = timeout_s
        self.compile_wait_s = compile_wait_s
        self.max_candidates = max_candidates
        self.on_event = on_event or (lambda kind, detail: log.info("kernels %s: %s", kind, detail))
        self._sites: dict[str, _Site] = {}
        self._lock = threading.Lock()
        self._waited = False

    @classmethod
    def connect(cls, urza: str, *, api_key: str | None = None, trusted_keys_dir: str | Path,
                cache_dir: str | Path | None = None, tezzeret: str | None = None,
                **kwargs: object) -> UrzaKernels:
        """Clients for the given "host:port" targets; the loader trusts `trusted_keys_dir`."""
        from esper.tezzeret.client import TezzeretClient

        client = UrzaClient(urza, api_key)
        cache = Path(cache_dir) if cache_dir is not None else Path(trusted_keys_dir).parent / "kernel-cache"
        loader = KernelLoader(fetcher(client), TrustedKeys.from_dir(trusted_keys_dir), cache)
        tz = TezzeretClient(tezzeret, api_key) if tezzeret else None
        return cls(client, loader, tezzeret=tz, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.urza.close()
        if self.tezzeret is not None:
            self.tezzeret.close()

    # ---- KernelSource ---------------------------------------------------------------
    def candidates(self, site: seed_pb2.SiteSignature) -> list[KernelCandidate]:
        """Urza's kernels for `site`; when it has none, Tezzeret compiles them (once), and
        this waits up to `compile_wait_s` for them before answering (empty: deferred)."""
        records = self._query(site)
        entry = self._entry(site)
        if not records and entry.state in ("unknown", "compiling"):
            self.ensure(site)
            if entry.state == "compiling" and self.compile_wait_s > 0:
                self._wait(entry, self.compile_wait_s)
                records = self._query(site)
        if records:
            self._ready(entry, len(records))
        return [KernelCandidate.from_record(r) for r in records]

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None, *,
             timeout_s: float | None = None) -> nn.Module:
        """A fresh module of a verified kernel (cached, else fetched from Urza).

        `site` is not needed: the loader checks the artifact against its own manifest and
        Kasmina checks the module against the slot when it germinates.
        """
        return self.loader.load(kernel_id, timeout_s or self.timeout_s)

    # ---- on-demand compile ----------------------------------------------------------
    def ensure(self, site: seed_pb2.SiteSignature) -> str:
        """Make sure kernels for `site` are in Urza or on their way; returns the site's
        state ("ready", "compiling" or "none"). Asks Tezzeret at most once per site."""
        entry = self._entry(site)
        if entry.state != "unknown":
            return entry.state
        if self._query(site, limit=1):
            self._ready(entry, None)
            return entry.state
        key = site_key(site)
        if self.tezzeret is None:
            entry.state = "none"
            self.on_event("no_kernels", f"Urza holds no kernels for site {key} and no Tezzeret "
                                        "endpoint is configured to compile them; no seed grows there")
            return entry.state
        jobs, unsupported = self.tezzeret.ensure_kernels(site, self.timeout_s,
                                                         blueprint_names=self.blueprints)
        if not jobs:
            entry.state = "none"
            self.on_event("no_kernels", f"no catalog blueprint supports site {key} "
                                        f"(unsupported: {', '.join(unsupported) or 'none offered'}); "
                                        "no seed grows there")
            return entry.state
        entry.state, entry.jobs, entry.since = "compiling", jobs, time.monotonic()
        if all(j.state in _DONE for j in jobs):
            self._settle(entry)
        else:
            self.on_event("compiling", f"Urza holds no kernels for site {key}; Tezzeret is "
                                       f"compiling {len(jobs)} catalog blueprint(s) for it "
                                       f"({', '.join(j.job_id for j in jobs)}); germination "
                                       "there waits until they are stored")
        return entry.state

    def ensure_all(self, sites: Sequence[seed_pb2.SiteSignature]) -> dict[str, str]:
        """`ensure` for each distinct site; site key → state."""
        return {site_key(s): self.ensure(s) for s in sites}

    def pending(self) -> list[str]:
        """Keys of the sites whose on-demand compile is still going."""
        return [k for k, e in self._sites.items() if e.state == "compiling"]

    def wait_pending(self, timeout_s: float | None = None) -> list[str]:
        """Wait for on-demand compiles: the first call up to `timeout_s` (default
        `compile_wait_s`) in all, later calls only look; returns the sites still pending."""
        budget = self.compile_wait_s if timeout_s is None else timeout_s
        if self._waited:
            budget = 0.0
        self._waited = True
        deadline = time.monotonic() + budget
        for key in self.pending():
            self._wait(self._sites[key], max(0.0, deadline - time.monotonic()))
        return self.pending()

    # ---- internals ------------------------------------------------------------------
    def _entry(self, site: seed_pb2.SiteSignature) -> _Site:
        key = site_key(site)
        with self._lock:
            entry = self._sites.get(key)
            if entry is None:
                entry = self._sites[key] = _Site(site=site)
            return entry

    def _query(self, site: seed_pb2.SiteSignature, limit: int | None = None) -> list:
        records, _ = self.urza.query_kernels(self.timeout_s, site=site,
                                             page_size=limit or self.max_candidates)
        return records

    def _wait(self, entry: _Site, budget_s: float) -> None:
        """Ask Tezzeret how the site's jobs stand, waiting up to `budget_s` for them."""
        assert self.tezzeret is not None
        if budget_s > 0.05:
            jobs, _ = self.tezzeret.ensure_kernels(entry.site, budget_s,
                                                   blueprint_names=self.blueprints, wait=True)
        else:
            jobs = [self.tezzeret.get_job(j.job_id, self.timeout_s) for j in entry.jobs]
        entry.jobs = jobs
        if all(j.state in _DONE for j in jobs):
            self._settle(entry)
        elif not entry.told_deferred:
            entry.told_deferred = True
            self.on_event("deferred", f"kernels for site {site_key(entry.site)} are still "
                                      f"compiling after {time.monotonic() - entry.since:.1f} s; "
                                      "germination there is deferred until they are stored")

    def _settle(self, entry: _Site) -> None:
        ok = [j for j in entry.jobs if j.state == tz_pb.COMPILE_JOB_STATE_SUCCEEDED]
        key = site_key(entry.site)
        if ok:
            failed = len(entry.jobs) - len(ok)
            entry.state = "ready"
            self.on_event("recovered", f"kernels for site {key} are in Urza: {len(ok)} compiled "
                                       f"on demand in {time.monotonic() - entry.since:.1f} s"
                                       + (f", {failed} failed" if failed else ""))
        else:
            entry.state = "none"
            errors = "; ".join(f"{j.blueprint_id}: {j.error}" for j in entry.jobs)[:1000]
            self.on_event("compile_failed", f"every on-demand compile for site {key} failed "
                                            f"({errors}); no seed grows there")

    def _ready(self, entry: _Site, count: int | None) -> None:
        was = entry.state
        entry.state = "ready"
        if was == "compiling":
            self.on_event("recovered", f"kernels for site {site_key(entry.site)} are in Urza"
                                       + (f" ({count})" if count is not None else ""))


__all__ = ["UrzaKernels"]
