"""An inline blueprint reaches Urza only after `compile_kernel` validated it.

Karn sends its proposals to Tezzeret inline; one that fails Tezzeret's checks must not
become a library entry. The compile step here is the real `compile_kernel` (in the
success case) or one that fails the way a validation check fails (`CompileError`),
because no allowlisted blueprint that passes `validate_ir` fails the compiled checks.
"""

from __future__ import annotations

import pytest

from esper.blueprints import builtin_blueprints, site_signature
from esper.blueprints.artifact import SigningKey, TrustedKeys, verify_artifact
from esper.tezzeret import core as tezzeret_core
from esper.tezzeret.compiler import CompileError, compile_kernel
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.jobs import JobStore
from esper.tezzeret.service import TezzeretCore
from generated.esper.common.v1 import kernel_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb

KEY = SigningKey.from_bytes(b"56" * 32)
BP = next(b for b in builtin_blueprints() if b.name == "lowrank_adapter")
SITE = site_signature("NC", 8)


class RecordingLibrary:
    """A Urza stand-in that logs every write, in order, into a shared journal."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.blueprints: dict[str, object] = {}
        self.kernels: dict[str, object] = {}

    def put_blueprint(self, bp, timeout_s):
        self.journal.append("put_blueprint")
        self.blueprints[bp.blueprint_id] = bp
        return bp.blueprint_id, True

    def get_blueprint(self, blueprint_id, timeout_s):
        return self.blueprints[blueprint_id]

    def put_kernel(self, artifact, timeout_s):
        self.journal.append("put_kernel")
        vk = verify_artifact(artifact, TrustedKeys([KEY]))
        self.kernels[vk.kernel_id] = vk.manifest
        return vk.kernel_id, True

    def query_kernels(self, timeout_s, *, blueprint_id="", site=None):
        return [kernel_pb2.KernelRecord(kernel_id=k, manifest=m) for k, m in self.kernels.items()
                if m.blueprint_id == blueprint_id and m.site == site], ""


@pytest.fixture
def core(tmp_path):
    journal: list[str] = []
    lib = RecordingLibrary(journal)
    store = JobStore(tmp_path / "jobs.sqlite")
    yield TezzeretCore(store, KEY, lambda: lib, TezzeretConfig(benchmark_iters=0)), lib, journal
    store.close()


async def test_inline_blueprint_is_stored_after_compile_kernel_passed(core, monkeypatch) -> None:
    c, lib, journal = core

    def compiling(*args, **kw):
        journal.append("compile_kernel")
        ck = compile_kernel(*args, **kw)
        journal.append("compile_kernel passed")
        return ck

    monkeypatch.setattr(tezzeret_core, "compile_kernel", compiling)
    job = await c.compile(BP, SITE, wait=True)
    assert job.state == pb.COMPILE_JOB_STATE_SUCCEEDED
    assert journal == ["compile_kernel", "compile_kernel passed", "put_blueprint", "put_kernel"]
    assert job.blueprint_id in lib.blueprints and job.kernel_id in lib.kernels


async def test_inline_blueprint_refused_by_compile_kernel_never_reaches_urza(core, monkeypatch) -> None:
    c, lib, journal = core

    def refusing(bp, site, *args, **kw):
        journal.append("compile_kernel")
        raise CompileError(f"blueprint {bp.blueprint_id}: forward produced NaN/Inf")

    monkeypatch.setattr(tezzeret_core, "compile_kernel", refusing)
    job = await c.compile(BP, SITE, wait=True)
    assert job.state == pb.COMPILE_JOB_STATE_FAILED and "NaN/Inf" in job.error
    assert journal == ["compile_kernel"]
    assert lib.blueprints == {} and lib.kernels == {}
