"""`UrzaKernels`, the platform's KernelSource: candidates from Urza, verified loads, and
sites without kernels compiled on demand by Tezzeret — once, visibly, within a bound."""

from __future__ import annotations

import pytest

from esper.blueprints import builtin_blueprints, site_key, site_signature
from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.errors import ArtifactError
from esper.kasmina.loader import KernelLoader
from esper.tezzeret.compiler import compile_kernel
from esper.urza.source import UrzaKernels
from generated.esper.common.v1 import kernel_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tz_pb

KEY = SigningKey.from_bytes(b"42" * 32)
BPS = {b.name: b for b in builtin_blueprints()}
SITE = site_signature("NC", 8)
OTHER = site_signature("NCL", 4, (40,))


class FakeUrza:
    """QueryKernels and GetKernel over dicts; counts queries."""

    def __init__(self) -> None:
        self.records: dict[str, list[kernel_pb2.KernelRecord]] = {}
        self.blobs: dict[str, bytes] = {}
        self.queries = 0

    def add(self, bp_name: str, site) -> str:
        ck = compile_kernel(BPS[bp_name], site, KEY, benchmark_iters=0)
        self.records.setdefault(site_key(site), []).append(
            kernel_pb2.KernelRecord(kernel_id=ck.kernel_id, manifest=ck.manifest))
        self.blobs[ck.kernel_id] = ck.artifact_bytes
        return ck.kernel_id

    def query_kernels(self, timeout_s, *, site, page_size):
        self.queries += 1
        return list(self.records.get(site_key(site), []))[:page_size], ""

    def get_kernel(self, kernel_id, timeout_s):
        return self.blobs[kernel_id]

    def close(self) -> None:
        pass


class FakeTezzeret:
    """Compiles into FakeUrza when asked to wait (or when `finish()` is called)."""

    def __init__(self, urza: FakeUrza, *, catalog=("norm_scale", "bottleneck_mlp"), fail=False,
                 finishes_on_wait=True) -> None:
        self.urza, self.catalog, self.fail = urza, catalog, fail
        self.finishes_on_wait = finishes_on_wait
        self.calls: list[tuple[str, bool]] = []
        self.done: set[str] = set()

    def _jobs(self, site):
        done = site_key(site) in self.done
        state = (tz_pb.COMPILE_JOB_STATE_FAILED if self.fail else tz_pb.COMPILE_JOB_STATE_SUCCEEDED) \
            if done else tz_pb.COMPILE_JOB_STATE_RUNNING
        return [tz_pb.CompileJob(job_id=f"cj-{n}", blueprint_id=BPS[n].blueprint_id, state=state,
                                 error="boom" if self.fail and done else "")
                for n in self.catalog if site.layout in BPS[n].layouts]

    def finish(self, site) -> None:
        if site_key(site) not in self.done:
            self.done.add(site_key(site))
            if not self.fail:
                for n in self.catalog:
                    if site.layout in BPS[n].layouts:
                        self.urza.add(n, site)

    def ensure_kernels(self, site, timeout_s, *, blueprint_names=(), wait=False):
        self.calls.append((site_key(site), wait))
        if wait and self.finishes_on_wait:
            self.finish(site)
        jobs = self._jobs(site)
        unsupported = [n for n in self.catalog if site.layout not in BPS[n].layouts]
        return jobs, unsupported

    def get_job(self, job_id, timeout_s):
        site = next(s for s in (SITE, OTHER) if site_key(s) in self.done) if self.done else SITE
        return next(j for j in self._jobs(site) if j.job_id == job_id)

    def close(self) -> None:
        pass


def _source(tmp_path, urza, tezzeret=None, **kw):
    events: list[tuple[str, str]] = []
    loader = KernelLoader(urza.get_kernel, TrustedKeys([KEY]), tmp_path / "cache")
    src = UrzaKernels(urza, loader, tezzeret=tezzeret, on_event=lambda k, d: events.append((k, d)), **kw)
    return src, events


def test_candidates_and_verified_loads_from_urza(tmp_path) -> None:
    urza = FakeUrza()
    kid = urza.add("norm_scale", SITE)
    tz = FakeTezzeret(urza)
    src, events = _source(tmp_path, urza, tz)
    (cand,) = src.candidates(SITE)
    assert cand.kernel_id == kid and cand.blueprint_name == "norm_scale" and cand.parameters > 0
    module = src.load(kid, SITE)
    assert sum(p.numel() for p in module.parameters()) == cand.parameters
    assert tz.calls == [] and events == []  # Urza had them: Tezzeret is never asked
    urza.blobs[kid] = urza.blobs[kid][:-3] + b"xyz"  # tampered in transit or at rest
    src.loader._memory.clear()
    for f in (tmp_path / "cache").iterdir():
        f.unlink()
    with pytest.raises(ArtifactError):
        src.load(kid, SITE)


def test_a_site_without_kernels_is_compiled_on_demand_once_and_waited_for(tmp_path) -> None:
    urza = FakeUrza()
    tz = FakeTezzeret(urza)
    src, events = _source(tmp_path, urza, tz, compile_wait_s=30.0)
    got = src.candidates(SITE)
    assert sorted(c.blueprint_name for c in got) == ["bottleneck_mlp", "norm_scale"]
    assert tz.calls == [(site_key(SITE), False), (site_key(SITE), True)]
    assert [k for k, _ in events] == ["compiling", "recovered"]
    assert "Tezzeret is compiling 2 catalog blueprint(s)" in events[0][1]
    src.candidates(SITE)
    assert len(tz.calls) == 2 and len(events) == 2  # never asked again


def test_without_waiting_germination_is_deferred_then_found(tmp_path) -> None:
    urza = FakeUrza()
    tz = FakeTezzeret(urza, finishes_on_wait=False)
    src, events = _source(tmp_path, urza, tz, compile_wait_s=0.0)
    assert src.candidates(SITE) == [] and src.pending() == [site_key(SITE)]
    assert [k for k, _ in events] == ["compiling"]
    tz.finish(SITE)  # Tezzeret stored them meanwhile
    assert len(src.candidates(SITE)) == 2 and src.pending() == []
    assert [k for k, _ in events] == ["compiling", "recovered"]
    assert tz.calls == [(site_key(SITE), False)]


def test_wait_pending_waits_once_then_only_looks(tmp_path) -> None:
    urza = FakeUrza()
    tz = FakeTezzeret(urza, finishes_on_wait=False)
    src, events = _source(tmp_path, urza, tz, compile_wait_s=5.0)
    assert src.ensure_all([SITE, SITE]) == {site_key(SITE): "compiling"}
    assert src.wait_pending() == [site_key(SITE)]       # the wait ran out
    assert tz.calls[-1] == (site_key(SITE), True)
    assert [k for k, _ in events] == ["compiling", "deferred"]
    assert src.wait_pending() == [site_key(SITE)]       # later: a look, no second wait
    assert tz.calls.count((site_key(SITE), True)) == 1
    tz.finish(SITE)
    assert src.wait_pending() == []
    assert [k for k, _ in events] == ["compiling", "deferred", "recovered"]


@pytest.mark.parametrize(("tz_kwargs", "kind", "words"), [
    (None, "no_kernels", "no Tezzeret endpoint"),
    ({"catalog": ("conv3x3_residual",)}, "no_kernels", "no catalog blueprint supports site"),
    ({"fail": True}, "compile_failed", "every on-demand compile for site"),
])
def test_sites_that_get_no_kernels_are_said_so_once(tmp_path, tz_kwargs, kind, words) -> None:
    urza = FakeUrza()
    tz = FakeTezzeret(urza, **tz_kwargs) if tz_kwargs is not None else None
    src, events = _source(tmp_path, urza, tz, compile_wait_s=5.0)
    assert src.candidates(SITE) == []
    assert src.candidates(SITE) == []
    assert events[-1][0] == kind and words in events[-1][1]
    assert sum(1 for k, _ in events if k == kind) == 1
