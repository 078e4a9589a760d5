"""Fuzz every RPC of every Esper service over gRPC (issue 11, point 2).

For each RPC: typed mutations of a valid request (`mutate.mutated`) and raw bytes
(`mutate.raw`), a bounded number of examples each, against all five services hosted on
one port as `esper up` hosts them. Must hold for every call:

* the status is never UNKNOWN or INTERNAL (bad input is INVALID_ARGUMENT, OUT_OF_RANGE,
  NOT_FOUND, ..., or the call succeeds);
* the reply (or the client's own DEADLINE_EXCEEDED) comes within the call's deadline;
* without a key, nothing is decoded: every raw call is UNAUTHENTICATED;

and after each RPC's examples the server is still SERVING and answers.

Examples are derandomised (the same ones every run, so the default suite cannot flake
on a newly found input); `ESPER_FUZZ_RANDOM=1` explores fresh ones and
`ESPER_FUZZ_EXAMPLES=<n>` changes how many (default 25 typed + 15 raw per RPC).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from esper.blueprints import builtin_blueprints
from generated.esper.common.v1 import health_pb2, seed_pb2
from generated.esper.karn.v1 import karn_service_pb2 as karn_pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as tamiyo_pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tezzeret_pb
from generated.esper.tolaria.v1 import tolaria_service_pb2 as tolaria_pb
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb
from tests.fuzz.hosted import ADMIN, READER, SITE, Platform
from tests.fuzz.mutate import mutated, raw

SERVICES = [
    urza_pb.DESCRIPTOR.services_by_name["UrzaService"],
    tezzeret_pb.DESCRIPTOR.services_by_name["TezzeretService"],
    tamiyo_pb.DESCRIPTOR.services_by_name["TamiyoService"],
    karn_pb.DESCRIPTOR.services_by_name["KarnService"],
    tolaria_pb.DESCRIPTOR.services_by_name["TolariaService"],
]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
EXAMPLES = int(os.environ.get("ESPER_FUZZ_EXAMPLES", "25"))
RAW_EXAMPLES = max(1, EXAMPLES * 3 // 5)
SLOW = {"/esper.tezzeret.v1.TezzeretService/Compile", "/esper.tezzeret.v1.TezzeretService/EnsureKernels",
        "/esper.karn.v1.KarnService/ProposeBlueprints", "/esper.tolaria.v1.TolariaService/StartRun"}
"""RPCs that may do seconds of real work for a valid request (compile, evolve, spawn)."""


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    derandomize=not os.environ.get("ESPER_FUZZ_RANDOM"),
                    phases=(Phase.explicit, Phase.generate),  # no shrinking against a live server
                    suppress_health_check=list(HealthCheck))


def _rid() -> str:
    return str(uuid.UUID(int=0x6F1C2A522A834C4E9D365F0F3E0B1A01))


def _snapshot() -> health_pb2.HealthSnapshot:
    slot = health_pb2.SlotHealth(slot_id="fc1", stage=seed_pb2.SEED_STAGE_DORMANT, site=SITE, host_grad_norm=1.0,
                                 finite=True, host_parameters=100)
    snap = health_pb2.HealthSnapshot(
        run_id="run-fuzz", epoch=6, total_epochs=30, global_step=600, slots=[slot],
        train_loss_history=[1.8, 1.1, 0.8, 0.72, 0.719, 0.7186], val_loss_history=[2.0, 1.2, 0.9, 0.8, 0.799, 0.7985],
        val_accuracy_history=[0.3, 0.6, 0.7, 0.73, 0.731, 0.7312], host_parameters=500, total_parameters=500,
        seeds_left=3, parameters_left=10_000, task="mnist1d")
    snap.graph.nodes.add(name="fc1", kind="linear", parameters=100)
    snap.graph.nodes.add(name="fc1/slot", kind="slot", slot_id="fc1")
    snap.graph.edges.add(src=0, dst=1)
    return snap


def _blueprint() -> Any:
    bp = next(b for b in builtin_blueprints() if b.name == "bottleneck_mlp")
    bp.description = "fuzz seed"
    return bp


def _artifact(p: Platform) -> bytes:
    """The seed kernel's artifact, read back from Urza (a valid upload: a duplicate)."""
    fn = p.channel().unary_stream("/esper.urza.v1.UrzaService/GetKernel",
                                  request_serializer=urza_pb.GetKernelRequest.SerializeToString,
                                  response_deserializer=urza_pb.GetKernelResponse.FromString)
    data = bytearray()
    for msg in fn(urza_pb.GetKernelRequest(kernel_id=p.kernel_id), timeout=30, metadata=(("x-api-key", ADMIN),)):
        if msg.WhichOneof("part") == "chunk":
            data += msg.chunk.data
    return bytes(data)


def _upload(artifact: bytes) -> list[urza_pb.PutKernelRequest]:
    import hashlib

    header = urza_pb.KernelUploadHeader(request_id=_rid(), total_size=len(artifact),
                                        artifact_sha256=hashlib.sha256(artifact).hexdigest())
    half = len(artifact) // 2
    return [urza_pb.PutKernelRequest(header=header), urza_pb.PutKernelRequest(chunk=artifact[:half]),
            urza_pb.PutKernelRequest(chunk=artifact[half:])]


def seeds(p: Platform) -> dict[str, Callable[[], Message | list[Message]]]:
    """A valid request of every RPC (a list of messages for the client stream)."""
    report = urza_pb.FieldReport(kernel_id=p.kernel_id, run_id="run-fuzz", slot_id="fc1", task="mnist1d",
                                 contribution=0.02, accuracy_delta=0.01, fate=urza_pb.SEED_FATE_FOSSILIZED,
                                 germinated_epoch=2, ended_epoch=9, parameters=64)
    report.recorded_at.GetCurrentTime()
    run_cfg = tolaria_pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=2, batch_size=32,
                                   labels={"team": "fuzz"})
    run_cfg.decide_timeout.FromMilliseconds(500)
    victims = p.victims or {}
    return {
        "/esper.urza.v1.UrzaService/PutBlueprint": lambda: urza_pb.PutBlueprintRequest(request_id=_rid(),
                                                                                       blueprint=_blueprint()),
        "/esper.urza.v1.UrzaService/GetBlueprint": lambda: urza_pb.GetBlueprintRequest(blueprint_id=p.blueprint_id),
        "/esper.urza.v1.UrzaService/ListBlueprints": lambda: urza_pb.ListBlueprintsRequest(
            page_size=5, family="lowrank_adapter", tags=[], layout=seed_pb2.ACTIVATION_LAYOUT_NC),
        "/esper.urza.v1.UrzaService/PutKernel": lambda: _upload(_artifact(p)),
        "/esper.urza.v1.UrzaService/GetKernel": lambda: urza_pb.GetKernelRequest(kernel_id=p.kernel_id,
                                                                                 chunk_size=4096),
        "/esper.urza.v1.UrzaService/QueryKernels": lambda: urza_pb.QueryKernelsRequest(
            blueprint_id=p.blueprint_id, site=SITE, page_size=5, max_parameters=1_000_000),
        "/esper.urza.v1.UrzaService/RecordOutcome": lambda: urza_pb.RecordOutcomeRequest(request_id=_rid(),
                                                                                         report=report),
        "/esper.urza.v1.UrzaService/RetireBlueprint": lambda: urza_pb.RetireBlueprintRequest(
            request_id=_rid(), blueprint_id=victims["retire"][0], reason="fuzz"),
        "/esper.urza.v1.UrzaService/DeleteBlueprint": lambda: urza_pb.DeleteBlueprintRequest(
            request_id=_rid(), blueprint_id=victims["delete"][0]),
        "/esper.urza.v1.UrzaService/DeleteKernel": lambda: urza_pb.DeleteKernelRequest(
            request_id=_rid(), kernel_id=victims["delete"][1]),
        "/esper.urza.v1.UrzaService/DeleteFieldReports": lambda: urza_pb.DeleteFieldReportsRequest(
            request_id=_rid(), kernel_id=p.kernel_id, run_id="run-fuzz"),
        "/esper.tezzeret.v1.TezzeretService/Compile": lambda: tezzeret_pb.CompileRequest(
            request_id=_rid(), blueprint_id=p.blueprint_id, site=SITE, wait=True),
        "/esper.tezzeret.v1.TezzeretService/GetCompileJob": lambda: tezzeret_pb.GetCompileJobRequest(
            job_id=_job_id(p)),
        "/esper.tezzeret.v1.TezzeretService/EnsureKernels": lambda: tezzeret_pb.EnsureKernelsRequest(
            request_id=_rid(), site=SITE, blueprint_names=["lowrank_adapter"], wait=True),
        "/esper.tamiyo.v1.TamiyoService/Decide": lambda: tamiyo_pb.DecideRequest(
            request_id=_rid(), snapshot=_snapshot(), allowed_blueprints=[p.blueprint_id]),
        "/esper.tamiyo.v1.TamiyoService/GetPolicyInfo": lambda: tamiyo_pb.GetPolicyInfoRequest(),
        "/esper.karn.v1.KarnService/ProposeBlueprints": lambda: karn_pb.ProposeBlueprintsRequest(
            request_id=_rid(), count=1, site=SITE, seed=7),
        "/esper.tolaria.v1.TolariaService/StartRun": lambda: tolaria_pb.StartRunRequest(request_id=_rid(),
                                                                                       config=run_cfg),
        "/esper.tolaria.v1.TolariaService/GetRun": lambda: tolaria_pb.GetRunRequest(run_id=p.run_id),
        "/esper.tolaria.v1.TolariaService/ListRuns": lambda: tolaria_pb.ListRunsRequest(
            page_size=5, state=tolaria_pb.RUN_STATE_UNSPECIFIED),
        "/esper.tolaria.v1.TolariaService/WatchRun": lambda: tolaria_pb.WatchRunRequest(run_id=p.run_id,
                                                                                       from_sequence=1),
        "/esper.tolaria.v1.TolariaService/StopRun": lambda: tolaria_pb.StopRunRequest(
            request_id=_rid(), run_id=p.run_id, reason="fuzz"),
        "/esper.tolaria.v1.TolariaService/ListJobs": lambda: tolaria_pb.ListJobsRequest(page_size=5),
    }


def _job_id(p: Platform) -> str:
    fn = p.channel().unary_unary("/esper.tezzeret.v1.TezzeretService/Compile",
                                 request_serializer=tezzeret_pb.CompileRequest.SerializeToString,
                                 response_deserializer=tezzeret_pb.CompileResponse.FromString)
    resp = fn(tezzeret_pb.CompileRequest(blueprint_id=p.blueprint_id, site=SITE, wait=True), timeout=60,
              metadata=(("x-api-key", ADMIN),))
    return resp.job.job_id


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    timeout: float


def invoke(ch: grpc.Channel, path: str, payload: bytes | list[bytes], key: str | None) -> Outcome:
    """One call with raw request bytes; a server stream is read for at most 3 messages."""
    m = METHODS[path]
    timeout = 20.0 if path in SLOW else 5.0
    md = () if key is None else (("x-api-key", key),)
    t0 = time.monotonic()
    code, details = grpc.StatusCode.OK, ""
    try:
        if m.client_streaming:
            ch.stream_unary(path)(iter(payload if isinstance(payload, list) else [payload]), timeout=timeout,
                                  metadata=md)
        elif m.server_streaming:
            call = ch.unary_stream(path)(payload, timeout=timeout, metadata=md)
            for i, _ in enumerate(call):
                if i >= 2:
                    call.cancel()
                    break
        else:
            ch.unary_unary(path)(payload, timeout=timeout, metadata=md)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
    return Outcome(code, details, time.monotonic() - t0, timeout)


SURVEY = os.environ.get("ESPER_FUZZ_SURVEY")
"""A file to append every violation to, instead of failing at the first (for a full list)."""


def check(o: Outcome, path: str, what: object) -> None:
    if SURVEY and (o.code in FORBIDDEN or o.elapsed > o.timeout + 2.0):
        with open(SURVEY, "a") as f:
            f.write(f"{path}\t{o.code.name}\t{o.elapsed:.2f}\t{o.details[:200]!r}\t{str(what)[:400]!r}\n")
        return
    assert o.code not in FORBIDDEN, f"{path} answered {o.code.name} ({o.details[:300]}) to {str(what)[:300]}"
    assert o.elapsed <= o.timeout + 2.0, f"{path} took {o.elapsed:.1f} s (deadline {o.timeout} s)"


def still_serving(p: Platform, path: str) -> None:
    assert p.serving(), f"the platform stopped SERVING after fuzzing {path}"
    with p.channel() as ch:
        fn = ch.unary_unary("/esper.tamiyo.v1.TamiyoService/GetPolicyInfo",
                            request_serializer=tamiyo_pb.GetPolicyInfoRequest.SerializeToString,
                            response_deserializer=tamiyo_pb.GetPolicyInfoResponse.FromString)
        assert fn(tamiyo_pb.GetPolicyInfoRequest(), timeout=10, metadata=(("x-api-key", ADMIN),)).policy


def test_every_rpc_has_a_seed(platform: Platform) -> None:
    assert set(seeds(platform)) == set(METHODS)


def _fresh_request_id(req: Message | list[Message], seed: Message | list[Message]) -> None:
    """A new idempotency key where the mutation left the seed's: a repeated key would be
    answered from the first call's record and never reach the store with the new values."""
    req_msg = req[0] if isinstance(req, list) else req
    seed_msg = seed[0] if isinstance(seed, list) else seed
    holder, seed_holder = (req_msg.header, seed_msg.header) if hasattr(req_msg, "header") else (req_msg, seed_msg)
    if "request_id" in holder.DESCRIPTOR.fields_by_name and holder.request_id == seed_holder.request_id:
        holder.request_id = str(uuid.uuid4())


@pytest.mark.parametrize("path", sorted(METHODS))
def test_typed_mutations(platform: Platform, path: str) -> None:
    seed = seeds(platform)[path]()
    with platform.channel() as ch:
        if isinstance(seed, list):  # PutKernel: a mutated header, chunks mutated or not
            header, chunks = seed[0], seed[1:]
            strategy = st.tuples(mutated(header), st.lists(st.one_of(st.sampled_from(chunks), mutated(chunks[0])),
                                                           max_size=4)).map(lambda hc: [hc[0], *hc[1]])
        else:
            strategy = mutated(seed)

        @_settings(EXAMPLES)
        @given(strategy)
        def run(req: Message | list[Message]) -> None:
            _fresh_request_id(req, seed)
            payload = [m.SerializeToString() for m in req] if isinstance(req, list) else req.SerializeToString()
            check(invoke(ch, path, payload, ADMIN), path, req)

        run()
    still_serving(platform, path)


@pytest.mark.parametrize("path", sorted(METHODS))
def test_raw_bytes(platform: Platform, path: str) -> None:
    seed = seeds(platform)[path]()
    first = seed[0] if isinstance(seed, list) else seed
    with platform.channel() as ch:

        @_settings(RAW_EXAMPLES)
        @given(st.lists(raw(first), min_size=1, max_size=3) if isinstance(seed, list) else raw(first),
               st.sampled_from([ADMIN, READER, None]))
        def run(payload: bytes | list[bytes], key: str | None) -> None:
            o = invoke(ch, path, payload, key)
            check(o, path, payload)
            if key is None:
                assert o.code == grpc.StatusCode.UNAUTHENTICATED, f"{path} without a key: {o.code.name} {o.details}"

        run()
    still_serving(platform, path)
