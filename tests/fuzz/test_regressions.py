"""The typed values of issue 11 point 2 that answered INTERNAL, as explicit cases over gRPC.

Each must be INVALID_ARGUMENT (naming the field) against the platform as `esper up` hosts
it. The Tolaria cases are fixed by proto rules and ListRuns' page token; the Urza ones by
Urza's own checks (issue 11's `harden-urza` half).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from esper.runtime.errors import as_esper_error
from esper.tolaria import runs as runs_mod
from esper.tolaria.runs import RunStore
from generated.esper.tolaria.v1 import tolaria_service_pb2 as tolaria_pb
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb
from tests.fuzz.hosted import ADMIN, SITE, Platform


def call(p: Platform, path: str, request: Message) -> grpc.RpcError | None:
    with p.channel() as ch:
        try:
            ch.unary_unary(path, request_serializer=type(request).SerializeToString)(
                request, timeout=10, metadata=(("x-api-key", ADMIN),))
        except grpc.RpcError as e:
            return e
    return None


def assert_invalid(err: grpc.RpcError | None, field: str) -> None:
    assert err is not None, "the call succeeded"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
    assert as_esper_error(err).field.startswith(field), err.details()  # type: ignore[attr-defined]


def _report(p: Platform, **kw: object) -> urza_pb.RecordOutcomeRequest:
    report = urza_pb.FieldReport(kernel_id=p.kernel_id, run_id="run-regress", slot_id="fc1",
                                 fate=urza_pb.SEED_FATE_PRUNED)
    for k, v in kw.items():
        if k == "recorded_at":
            report.recorded_at.seconds = v  # type: ignore[assignment]
        else:
            setattr(report, k, v)
    return urza_pb.RecordOutcomeRequest(report=report)


# --- Tolaria (fixed here: proto rules and the page token) --------------------------------

@pytest.mark.parametrize("seconds", [2**63 - 1, -(2**63), -1, 3601])
def test_start_run_decide_timeout_out_of_range(platform: Platform, seconds: int) -> None:
    cfg = tolaria_pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=1, batch_size=8)
    cfg.decide_timeout.seconds = seconds
    assert_invalid(call(platform, "/esper.tolaria.v1.TolariaService/StartRun",
                        tolaria_pb.StartRunRequest(config=cfg)), "config.decide_timeout")


@pytest.mark.parametrize("token", [
    b'{"after": 1e999}'.hex(),
    json.dumps({"after": 2**63}).encode().hex(),
    json.dumps({"after": -1}).encode().hex(),
    json.dumps({"after": "7"}).encode().hex(),
    json.dumps([1]).encode().hex(),
    json.dumps(None).encode().hex(),
    "not hex at all",
    "ab" * 512,
])
def test_list_runs_refuses_hand_made_page_tokens(platform: Platform, token: str) -> None:
    err = call(platform, "/esper.tolaria.v1.TolariaService/ListRuns", tolaria_pb.ListRunsRequest(page_token=token))
    assert_invalid(err, "page_token")
    assert "fromhex" not in err.details() and "non-hexadecimal" not in err.details()  # type: ignore[union-attr]


def test_list_runs_pages_fit_the_default_client_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 runs with 1.3 MB of labels each once made the default page 6 MB. Labels are now
    # bounded by the proto; the page's byte budget covers whatever else makes runs big.
    monkeypatch.setattr(runs_mod, "MAX_PAGE_BYTES", 100_000)
    store = RunStore(tmp_path)
    try:
        big = {f"k{i:02d}": "v" * 256 for i in range(32)}  # the most labels a valid config can carry
        ids = [store.create(tolaria_pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=1,
                                                 batch_size=8, labels=big))[0].run_id for _ in range(30)]
        seen, token, pages = [], "", 0
        while True:
            page, token = store.list(page_size=1000, page_token=token)
            size = sum(r.to_proto().ByteSize() for r in page)
            assert size <= 100_000 or len(page) == 1
            seen += [r.run_id for r in page]
            pages += 1
            if not token:
                break
        assert seen == ids and pages > 1
    finally:
        store.close()


# --- Urza -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_query_kernels_max_parameters_beyond_int64(platform: Platform, value: int) -> None:
    assert_invalid(call(platform, "/esper.urza.v1.UrzaService/QueryKernels",
                        urza_pb.QueryKernelsRequest(site=SITE, max_parameters=value)), "max_parameters")


@pytest.mark.parametrize(("field", "value"), [
    ("contribution", math.nan), ("accuracy_delta", math.nan), ("contribution", math.inf),
    ("contribution", -math.inf), ("parameters", 2**63), ("recorded_at", 2**63 - 1), ("recorded_at", -(2**63)),
])
def test_record_outcome_values_out_of_range(platform: Platform, field: str, value: object) -> None:
    assert_invalid(call(platform, "/esper.urza.v1.UrzaService/RecordOutcome", _report(platform, **{field: value})),
                   f"report.{field}")


def _urza_token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _raw_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _kernel_query_fingerprint() -> str:
    from esper.urza.store.base import KernelQuery, _fingerprint

    return _fingerprint(KernelQuery())


@pytest.mark.parametrize("offset", [str(2**63), "1e999"])
def test_query_kernels_refuses_hand_made_page_tokens(platform: Platform, offset: str) -> None:
    token = _raw_token(f'{{"o": {offset}, "f": "{_kernel_query_fingerprint()}"}}')
    err = call(platform, "/esper.urza.v1.UrzaService/QueryKernels", urza_pb.QueryKernelsRequest(page_token=token))
    assert_invalid(err, "page_token")


@pytest.mark.parametrize("token", ["%%% not base64 %%%", _urza_token([1]), _urza_token({"o": "x", "f": "y"})])
def test_urza_lists_refuse_malformed_page_tokens(platform: Platform, token: str) -> None:
    for path, req in [("/esper.urza.v1.UrzaService/QueryKernels", urza_pb.QueryKernelsRequest(page_token=token)),
                      ("/esper.urza.v1.UrzaService/ListBlueprints", urza_pb.ListBlueprintsRequest(page_token=token))]:
        assert_invalid(call(platform, path, req), "page_token")
