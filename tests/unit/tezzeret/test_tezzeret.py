"""Tezzeret core (compile, validate, profile, sign) and the job-backed service core."""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import builtin_blueprints, make_blueprint, node, site_signature, supports
from esper.blueprints.artifact import SigningKey, TrustedKeys, verify_artifact
from esper.errors import (
    BlueprintError,
    ConfigError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from esper.kasmina.loader import KernelLoader
from esper.tezzeret.compiler import compile_catalog, compile_kernel, validate_kernel
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.jobs import JobStore
from esper.tezzeret.service import TezzeretCore
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb

KEY = SigningKey.from_bytes(b"55" * 32)
BPS = {b.name: b for b in builtin_blueprints()}


def test_compile_is_deterministic_and_verifiable():
    site = site_signature("NCL", 8, (12,))
    a = compile_kernel(BPS["conv3_residual_1d"], site, KEY, benchmark_iters=0)
    b = compile_kernel(BPS["conv3_residual_1d"], site, KEY, benchmark_iters=0)
    assert a.kernel_id == b.kernel_id and a.artifact_bytes == b.artifact_bytes
    vk = verify_artifact(a.artifact_bytes, TrustedKeys([KEY]), expected_kernel_id=a.kernel_id)
    m = a.manifest
    assert m.blueprint_id == BPS["conv3_residual_1d"].blueprint_id
    assert m.profile.parameters == 2 * (8 * 8 * 3 + 8) == vk.plan.parameter_count
    # Two convs of 8→8, width 3, over 12 positions: 2 FLOPs per MAC.
    assert m.profile.forward_flops_per_sample == 2 * 2 * 8 * 8 * 3 * 12
    assert m.validation.shape_ok and m.validation.forward_finite and m.validation.backward_finite
    assert m.validation.init_max_abs_delta == 0.0
    assert m.site == site


def test_benchmark_fills_latency():
    ck = compile_kernel(BPS["bottleneck_mlp"], site_signature("NC", 16), KEY, benchmark_iters=5)
    p = ck.manifest.profile
    assert 0 < p.latency_us_p50 <= p.latency_us_p99
    assert p.benchmark_batch_size == 8 and p.benchmark_device == "cpu"


def test_unsupported_layout_and_bad_ir():
    with pytest.raises(FailedPreconditionError, match="not NC"):
        compile_kernel(BPS["conv3x3_residual"], site_signature("NC", 4), KEY)
    bad = make_blueprint("bad", "bad", "", [1], [node("a", "linear", ["input"])], "a")
    with pytest.raises(BlueprintError, match="not zero"):
        compile_kernel(bad, site_signature("NC", 4), KEY)


def test_validate_kernel_measures_a_non_preserving_module():
    report = validate_kernel(torch.nn.Linear(4, 4), site_signature("NC", 4))
    assert report.shape_ok and report.init_max_abs_delta > 1e-3


def test_compile_catalog_covers_supported_pairs():
    published = []
    sites = [site_signature("NC", 8), site_signature("NCHW", 4, (4, 4))]
    out = compile_catalog(sites, KEY, publish=published.append, benchmark_iters=0)
    # Parallel-slot blueprints (tagged slot-parallel) have no kernel at output sites.
    expected = sum(1 for s in sites for b in BPS.values() if supports(b, s))
    assert len(out) == expected == len(published) == len({c.kernel_id for c in out})


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown tezzeret settings \\['bogus'\\]"):
        TezzeretConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="benchmark_iters=-1"):
        TezzeretConfig.from_dict({"benchmark_iters": -1})


class MemoryLibrary:
    """A Urza stand-in holding verified artifacts in dicts (Urza has its own tests)."""

    def __init__(self):
        self.blueprints, self.kernels, self.down = {}, {}, False
        self.puts = 0

    def _check(self):
        if self.down:
            raise UnavailableError("urza down")

    def put_blueprint(self, bp, timeout_s):
        self._check()
        self.blueprints[bp.blueprint_id] = bp
        return bp.blueprint_id, True

    def get_blueprint(self, blueprint_id, timeout_s):
        self._check()
        if blueprint_id not in self.blueprints:
            raise NotFoundError(f"no blueprint {blueprint_id}")
        return self.blueprints[blueprint_id]

    def put_kernel(self, artifact, timeout_s):
        self._check()
        vk = verify_artifact(artifact, TrustedKeys([KEY]))
        self.kernels[vk.kernel_id] = (vk.manifest, artifact)
        self.puts += 1
        return vk.kernel_id, True

    def query_kernels(self, timeout_s, *, blueprint_id="", site=None):
        from generated.esper.common.v1 import kernel_pb2
        self._check()
        return [kernel_pb2.KernelRecord(kernel_id=k, manifest=m) for k, (m, _) in
                self.kernels.items() if m.blueprint_id == blueprint_id and m.site == site], ""


@pytest.fixture
def core(tmp_path):
    lib = MemoryLibrary()
    store = JobStore(tmp_path / "jobs.sqlite")
    c = TezzeretCore(store, KEY, lambda: lib, TezzeretConfig(benchmark_iters=0))
    yield c, lib, tmp_path
    store.close()


async def test_service_core_is_idempotent_and_persistent(core):
    c, lib, tmp_path = core
    site = site_signature("NLD", 8, (4,))
    job = await c.compile(BPS["squeeze_excite"], site, wait=True)
    assert job.state == pb.COMPILE_JOB_STATE_SUCCEEDED and job.kernel_id in lib.kernels
    again = await c.compile(BPS["squeeze_excite"].blueprint_id, site, wait=True)
    assert (again.job_id, again.kernel_id) == (job.job_id, job.kernel_id)
    assert lib.puts == 1
    # A new process over the same job store returns the same job without compiling.
    store2 = JobStore(tmp_path / "jobs.sqlite")
    c2 = TezzeretCore(store2, KEY, lambda: lib, TezzeretConfig(benchmark_iters=0))
    third = await c2.compile(BPS["squeeze_excite"], site, wait=True)
    assert third.kernel_id == job.kernel_id and lib.puts == 1
    # Lost job state: Urza's record of the pair is reused rather than recompiled.
    c3 = TezzeretCore(JobStore(tmp_path / "fresh.sqlite"), KEY, lambda: lib,
                      TezzeretConfig(benchmark_iters=0))
    fourth = await c3.compile(BPS["squeeze_excite"], site, wait=True)
    assert fourth.kernel_id == job.kernel_id and lib.puts == 1
    store2.close()
    # The kernel loads through Kasmina's loader.
    loader = KernelLoader(lambda k, t: lib.kernels[k][1], TrustedKeys([KEY]), tmp_path / "cache")
    module = loader.load(job.kernel_id, 5.0)
    x = torch.randn(2, 4, 8)
    assert torch.equal(module(x), torch.zeros_like(x))


async def test_failed_upload_is_recorded_then_retried(core):
    c, lib, _ = core
    site = site_signature("NC", 8)
    lib.blueprints[BPS["norm_scale"].blueprint_id] = BPS["norm_scale"]
    lib.down = True
    with pytest.raises(UnavailableError):
        await c.compile(BPS["norm_scale"].blueprint_id, site, wait=True)
    lib.down = False
    job = await c.compile(BPS["norm_scale"].blueprint_id, site, wait=False)
    await c.drain()
    job = c.store.get(job.job_id)
    assert job.state == pb.COMPILE_JOB_STATE_SUCCEEDED and lib.puts == 1


async def test_upload_failure_marks_job_failed(core):
    c, lib, _ = core
    site = site_signature("NC", 8)
    job = await c.compile(BPS["lowrank_adapter"], site, wait=False)
    lib.down = True
    await c.drain()
    failed = c.store.get(job.job_id)
    assert failed.state == pb.COMPILE_JOB_STATE_FAILED and "urza down" in failed.error
    with pytest.raises(NotFoundError, match="no compile job 'cj-nope'"):
        c.store.get("cj-nope")


async def test_unknown_blueprint_and_layout(core):
    c, _lib, _ = core
    with pytest.raises(NotFoundError):
        await c.compile("bp-0000000000000000", site_signature("NC", 4), wait=True)
    with pytest.raises(FailedPreconditionError, match="supports layouts"):
        await c.compile(BPS["conv3x3_residual"], site_signature("NC", 4), wait=True)


def test_config_catalog_blueprints_must_be_builtin():
    cfg = TezzeretConfig.from_dict({"catalog_blueprints": ["norm_scale"]})
    assert cfg.catalog_blueprints == ("norm_scale",)
    with pytest.raises(ConfigError, match="catalog_blueprints \\['nope'\\]: not built-in"):
        TezzeretConfig.from_dict({"catalog_blueprints": ["nope"]})


async def test_service_start_resumes_unfinished_jobs_and_compiles_only_the_named_catalog(tmp_path):
    from esper.runtime.spec import PlatformContext
    from esper.tezzeret.service import create_service

    lib = MemoryLibrary()
    key_file = tmp_path / "signing.pem"
    KEY.save(key_file)
    bp = BPS["lowrank_adapter"]
    lib.blueprints[bp.blueprint_id] = bp
    # A job a crashed Tezzeret left QUEUED: the next start must finish it.
    (tmp_path / "tezzeret").mkdir()
    store = JobStore(tmp_path / "tezzeret" / "jobs.sqlite")
    job, _ = store.get_or_create(bp.blueprint_id, site_signature("NC", 8))
    store.close()
    ctx = PlatformContext(data_dir=tmp_path, settings={"tezzeret": {
        "signing_key_file": str(key_file), "benchmark_iters": 0,
        "trusted_keys_dir": str(tmp_path / "trusted"),
        "catalog_sites": [{"layout": "NC", "channels": 4}],
        "catalog_blueprints": ["norm_scale"]}})
    spec = create_service(ctx, urza=lambda: lib)
    await spec.on_start()
    import asyncio

    for _ in range(200):  # the catalog compiles in the background
        names = {m.blueprint_name for m, _ in lib.kernels.values()}
        if {"lowrank_adapter", "norm_scale"} <= names:
            break
        await asyncio.sleep(0.05)
    await spec.on_stop()
    sites = {(m.blueprint_name, m.site.channels) for m, _ in lib.kernels.values()}
    assert ("lowrank_adapter", 8) in sites  # the resumed job
    assert {name for name, ch in sites if ch == 4} == {"norm_scale"}  # only the named catalog
