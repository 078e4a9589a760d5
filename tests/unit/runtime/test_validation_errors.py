"""Violations as dotted field paths; typed errors ⇄ status codes."""

from __future__ import annotations

import grpc
import pytest

from esper import errors as E
from esper.runtime.errors import (
    RequestValidationError,
    as_esper_error,
    code_for,
    to_rich_status,
    trailing_metadata,
)
from esper.runtime.validation import check, violations_of
from generated.esper.common.v1 import blueprint_pb2


def test_paths_name_repeated_indices_and_nested_fields() -> None:
    ir = blueprint_pb2.BlueprintIR(ir_version=1, output="out", nodes=[
        blueprint_pb2.IRNode(name="ok", op="relu"),
        blueprint_pb2.IRNode(name="Bad Name", op="linear", inputs=["input"] * 9),
    ])
    got = {(field, rule) for field, _, rule in violations_of(ir)}
    assert got == {("nodes[1].name", "string.pattern"), ("nodes[1].inputs", "repeated.max_items")}
    with pytest.raises(RequestValidationError) as ei:
        check(ir)
    assert "nodes[1].name" in str(ei.value) and ei.value.field in {"nodes[1].name", "nodes[1].inputs"}


def test_a_valid_message_has_no_violations() -> None:
    ir = blueprint_pb2.BlueprintIR(ir_version=1, output="a", nodes=[blueprint_pb2.IRNode(name="a", op="relu")])
    assert violations_of(ir) == []
    check(ir)


@pytest.mark.parametrize(("exc", "code"), [
    (E.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (E.BlueprintError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (E.UntrustedKeyError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (E.ArtifactError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (E.IllegalTransitionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (E.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
    (E.AuthError("x"), grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
    (NotImplementedError(), grpc.StatusCode.UNIMPLEMENTED),
    (E.EsperError("x"), grpc.StatusCode.INTERNAL),
    (ZeroDivisionError(), grpc.StatusCode.INTERNAL),
])
def test_code_mapping(exc: BaseException, code: grpc.StatusCode) -> None:
    assert code_for(exc) == code


class _Failed(grpc.RpcError):
    """What a client holds after a failed call: code, details and trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple) -> None:  # type: ignore[type-arg]
        self._c, self._d, self._t = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._c

    def details(self) -> str:
        return self._d

    def trailing_metadata(self) -> tuple:  # type: ignore[type-arg]
        return self._t


@pytest.mark.parametrize("exc", [
    E.IllegalTransitionError("slot s1 is FOSSILIZED"),
    E.UntrustedKeyError("key k9 is not trusted"),
    E.NotFoundError("no kernel"),
    E.BlueprintError("unknown op 'gelu9'", field="ir.nodes[0].op"),
])
def test_round_trip_through_rich_status(exc: E.EsperError) -> None:
    st = to_rich_status(exc)
    back = as_esper_error(_Failed(code_for(exc), st.message, trailing_metadata(st)))
    assert type(back) is type(exc)
    assert back.reason == exc.reason
    if isinstance(exc, E.InvalidArgumentError):
        assert back.field == exc.field  # type: ignore[attr-defined]


def test_foreign_status_maps_by_code() -> None:
    back = as_esper_error(_Failed(grpc.StatusCode.UNAVAILABLE, "connection refused", ()))
    assert type(back) is E.UnavailableError and "connection refused" in str(back)
    back = as_esper_error(_Failed(grpc.StatusCode.UNIMPLEMENTED, "nope", ()))
    assert type(back) is E.EsperError and back.reason == "UNIMPLEMENTED"


def test_a_huge_invalid_request_is_checked_up_to_its_first_violation() -> None:
    # 20,000 bad items once took protovalidate 3 s to list, holding the event loop.
    from generated.esper.tamiyo.v1 import tamiyo_service_pb2

    req = tamiyo_service_pb2.DecideRequest(allowed_blueprints=["x"] * 20_000)
    with pytest.raises(RequestValidationError) as ei:
        check(req)
    assert len(ei.value.violations) == 1
    assert "checked up to its first broken rule" in str(ei.value)
    assert ei.value.metadata["violations"] == "1+"


def test_a_small_invalid_request_names_every_broken_field_up_to_a_cap() -> None:
    ir = blueprint_pb2.BlueprintIR(ir_version=2, output="", nodes=[blueprint_pb2.IRNode(name="A", op="")])
    with pytest.raises(RequestValidationError) as ei:
        check(ir)
    assert {f for f, _, _ in ei.value.violations} == {"ir_version", "output", "nodes[0].name", "nodes[0].op"}
    assert ei.value.metadata["violations"] == "4"


def test_status_details_stay_small_whatever_the_error_says() -> None:
    # A message echoing a client's 1.5 MB value came back as RESOURCE_EXHAUSTED (the
    # client refuses trailers over 16 KiB) instead of the error.
    exc = E.InvalidArgumentError("bad value " + "x" * 1_500_000, field="f" * 10_000,
                                 metadata={"k": "v" * 100_000})
    st = to_rich_status(exc)
    assert len(st.SerializeToString()) < 4096
    assert st.message.endswith("more characters)") and len(st.message) <= 1024
    back = as_esper_error(_Failed(code_for(exc), st.message, trailing_metadata(st)))
    assert type(back) is E.InvalidArgumentError and back.field.startswith("fff")
