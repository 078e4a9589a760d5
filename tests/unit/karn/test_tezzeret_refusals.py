"""Karn's answer for a child that passed pre-flight but that Tezzeret did not compile.

Pre-flight runs the same checks as Tezzeret, so this path is rare — which is why it needs
a test: Tezzeret refusing the request (typed error), a compile job that FAILED, and one
still running at the deadline must each come back as a rejected proposal with its reason
and no kernel, while the other proposals of the same call go on.
"""

from __future__ import annotations

import pytest

from esper.blueprints import builtin_blueprints, site_signature
from esper.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from esper.karn.service import KarnConfig, KarnCore
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tz

SITE = site_signature("NCL", 8, (40,))


class Library:
    """Urza with the built-in catalog and no kernels (every parent scores 0)."""

    def list_blueprints(self, timeout_s, *, layout=0, page_size=0, page_token=""):
        return [b for b in builtin_blueprints() if not layout or layout in b.layouts], ""

    def query_kernels(self, timeout_s, *, site=None, page_size=0, page_token=""):
        return [], ""


class ScriptedTezzeret:
    """`compile` whose n-th call does the n-th scripted thing."""

    def __init__(self, script):
        self.script = list(script)
        self.calls: list[str] = []

    async def __call__(self, bp, site, timeout_s):
        self.calls.append(bp.name)
        what = self.script[len(self.calls) - 1]
        if isinstance(what, Exception):
            raise what
        job = tz.CompileJob(job_id=f"cj-{len(self.calls)}", state=what,
                            blueprint_id=f"bp-{len(self.calls):016x}")
        if what == tz.COMPILE_JOB_STATE_SUCCEEDED:
            job.kernel_id = "sha256:" + f"{len(self.calls):x}" * 64
        elif what == tz.COMPILE_JOB_STATE_FAILED:
            job.error = "CompileError: backward produced NaN/Inf gradients"
        return job


async def _propose(script, count):
    tezzeret = ScriptedTezzeret(script)
    core = KarnCore(Library, tezzeret, KarnConfig.from_dict({"evolve": {"crossover_rate": 0.0}}))
    resp = await core.propose(pb.ProposeBlueprintsRequest(count=count, site=SITE, seed=11), 60.0)
    passed = [p for p in resp.proposals if not p.rejection.startswith("pre-flight")]
    return tezzeret, resp, passed


async def test_children_tezzeret_refuses_after_pre_flight_are_rejected_with_its_reason() -> None:
    script = [
        InvalidArgumentError("ir.nodes[1].op: not allowed here", field="blueprint.ir"),
        tz.COMPILE_JOB_STATE_FAILED,
        tz.COMPILE_JOB_STATE_RUNNING,
        FailedPreconditionError("blueprint supports layouts ['NC'], not 'NCL'"),
        tz.COMPILE_JOB_STATE_SUCCEEDED,
    ]
    tezzeret, resp, passed = await _propose(script, count=5)
    # Every child that passed pre-flight went to Tezzeret, in order, and only those.
    assert [p.blueprint.name for p in passed] == tezzeret.calls and len(passed) == 5
    refused, failed, running, precondition, ok = passed
    assert refused.rejection.startswith("tezzeret: InvalidArgumentError: ")
    assert "ir.nodes[1].op" in refused.rejection
    assert failed.rejection == "tezzeret: CompileError: backward produced NaN/Inf gradients"
    assert running.rejection == "tezzeret: job cj-3 still COMPILE_JOB_STATE_RUNNING at the deadline"
    assert precondition.rejection.startswith("tezzeret: FailedPreconditionError: ")
    for p in (refused, failed, running, precondition):
        assert not p.accepted and p.kernel_id == ""
    # The call went on after the refusals: the last child was compiled and accepted.
    assert ok.accepted and ok.rejection == "" and ok.kernel_id == "sha256:" + "5" * 64
    assert ok.blueprint.blueprint_id == "bp-0000000000000005"


async def test_tezzeret_unavailable_fails_the_call_instead_of_rejecting_the_child() -> None:
    # Unavailability says nothing about the child: Karn must not answer "rejected" for it
    # (a retry with the same request_id would then replay a false verdict).
    with pytest.raises(UnavailableError):
        await _propose([UnavailableError("tezzeret down")], count=1)
