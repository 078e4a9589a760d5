"""Typed errors ⇄ gRPC status codes with `google.rpc.Status` details.

Servers turn every `esper.errors.EsperError` into a status code plus a `google.rpc.Status`
carrying `ErrorInfo{reason, domain="esper.dev", metadata}` (and `BadRequest` field
violations for invalid arguments), sent in the `grpc-status-details-bin` trailer that
grpcio-status reads. `ErrorInfo.metadata` always names the `method` that failed, plus
the error's own facts (`field`, `requiredScope`, `messageType`, ...). Clients turn a
`grpc.RpcError` back into the same typed error with `as_esper_error`.
Anything that is not an `EsperError` is a bug: INTERNAL, never UNKNOWN.

Reasons the runtime itself gives (services add their own, e.g. BLOB_CORRUPT):
API_KEY_MISSING, API_KEY_INVALID, API_KEY_SCOPE_INSUFFICIENT, REQUEST_UNDECODABLE,
REQUEST_FIELD_INVALID, DEADLINE_EXPIRED_ON_ARRIVAL, METHOD_NOT_IMPLEMENTED,
METHOD_UNKNOWN, INTERNAL_ERROR.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

from esper import errors as E

DOMAIN = "esper.dev"
MAX_MESSAGE_CHARS = 1024
"""Longest status message sent; longer ones are cut (a message can echo a client's value)."""
MAX_VIOLATIONS = 32
MAX_DETAIL_CHARS = 256
"""Longest BadRequest description or ErrorInfo metadata value sent.

The message travels in the grpc-message header and again, with the details, in the
grpc-status-details-bin trailer; clients refuse trailers beyond 16 KiB (8 KiB soft), so
a status with a 1.5 MB message arrived as RESOURCE_EXHAUSTED instead of the error."""
"""`ErrorInfo.domain` of every error Esper raises."""
STATUS_DETAILS_KEY = "grpc-status-details-bin"

current_method: contextvars.ContextVar[str] = contextvars.ContextVar("esper_current_method", default="")
"""gRPC path of the call being served (set by the host for every call it serves)."""

# Most specific first: the first class in an exception's MRO that appears here decides.
_CODES: dict[type[BaseException], grpc.StatusCode] = {
    E.UntrustedKeyError: grpc.StatusCode.FAILED_PRECONDITION,
    E.ArtifactError: grpc.StatusCode.INVALID_ARGUMENT,
    E.IllegalTransitionError: grpc.StatusCode.FAILED_PRECONDITION,
    E.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    E.BlueprintError: grpc.StatusCode.INVALID_ARGUMENT,
    E.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    E.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    E.NotFoundError: grpc.StatusCode.NOT_FOUND,
    E.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    E.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    E.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    E.AuthError: grpc.StatusCode.UNAUTHENTICATED,
    E.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}
# Errors added to esper/errors.py after this table was written still map precisely when
# their class name says which code they mean (e.g. OutOfRangeError → OUT_OF_RANGE).
for _cls in vars(E).values():
    if isinstance(_cls, type) and issubclass(_cls, E.EsperError) and _cls not in _CODES:
        _name = _cls.__name__.removesuffix("Error")
        _snake = "".join("_" + c if c.isupper() else c for c in _name).lstrip("_").upper()
        if _snake in grpc.StatusCode.__members__:
            _CODES[_cls] = grpc.StatusCode[_snake]


class RequestValidationError(E.InvalidArgumentError):
    """A request broke one or more protovalidate rules; one violation per field."""

    reason = "REQUEST_FIELD_INVALID"

    def __init__(self, message: str, violations: Sequence[tuple[str, str, str]],
                 *, message_type: str = "", total: int | None = None) -> None:
        """`violations`: (dotted field path, description, rule id) per broken rule reported;
        `total`: how many rules are broken in all (None: not counted, at least one)."""
        md = {"violations": str(total if total is not None else f"{len(violations)}+")}
        if message_type:
            md["messageType"] = message_type
        super().__init__(message, field=violations[0][0] if violations else "", metadata=md)
        self.violations = list(violations)


class RequestDecodeError(E.InvalidArgumentError):
    """The request bytes are not a serialized message of the method's request type."""

    reason = "REQUEST_UNDECODABLE"

    def __init__(self, message: str, *, message_type: str, size: int) -> None:
        super().__init__(message, metadata={"messageType": message_type, "size": str(size)})


def code_for(exc: BaseException | type[BaseException]) -> grpc.StatusCode:
    """Status code of an exception (or class): its most specific mapped class, else INTERNAL."""
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` characters with a note of how much was cut."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[:max(0, limit - len(note))] + note


def _field_violations(exc: E.InvalidArgumentError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    if isinstance(exc, RequestValidationError):
        return [
            error_details_pb2.BadRequest.FieldViolation(field=clip(f, MAX_DETAIL_CHARS),
                                                        description=clip(d, MAX_DETAIL_CHARS), reason=r)
            for f, d, r in exc.violations[:MAX_VIOLATIONS]
        ]
    if isinstance(exc, RequestDecodeError):
        # The whole request is at fault: the empty path names the request itself.
        return [error_details_pb2.BadRequest.FieldViolation(
            field="", description=clip(str(exc), MAX_DETAIL_CHARS), reason=exc.reason)]
    if exc.field:
        return [error_details_pb2.BadRequest.FieldViolation(
            field=clip(exc.field, MAX_DETAIL_CHARS), description=clip(str(exc), MAX_DETAIL_CHARS),
            reason=exc.reason)]
    return []


def _reason(exc: BaseException, code: grpc.StatusCode) -> str:
    if isinstance(exc, E.EsperError):
        return exc.reason
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "METHOD_NOT_IMPLEMENTED"
    return "INTERNAL_ERROR"


def to_rich_status(
    exc: BaseException, *, message: str | None = None, code: grpc.StatusCode | None = None,
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """`google.rpc.Status` for an exception (ErrorInfo always; BadRequest where a field is known).

    ErrorInfo.metadata: `method` (the call being served, when there is one), the
    exception's own `metadata`, its `field` for invalid arguments, then `metadata`.
    """
    code = code or code_for(exc)
    md: dict[str, str] = {}
    method = current_method.get()
    if method:
        md["method"] = method
    own = getattr(exc, "metadata", None)
    if own:
        md.update(own)
    if isinstance(exc, E.InvalidArgumentError) and exc.field:
        md.setdefault("field", exc.field)
    if metadata:
        md.update(metadata)
    md = {clip(str(k), 64): clip(str(v), MAX_DETAIL_CHARS) for k, v in list(md.items())[:16]}
    text = clip(message if message is not None else str(exc), MAX_MESSAGE_CHARS)
    st = status_pb2.Status(code=code.value[0], message=text)
    st.details.add().Pack(error_details_pb2.ErrorInfo(reason=_reason(exc, code), domain=DOMAIN,
                                                      metadata=md))
    if isinstance(exc, E.InvalidArgumentError):
        violations = _field_violations(exc)
        if violations:
            st.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    return st


def trailing_metadata(st: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return ((STATUS_DETAILS_KEY, st.SerializeToString()),)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, message: str | None = None,
                     *, metadata: dict[str, str] | None = None) -> None:
    """End the call with the status an exception maps to (raises grpc.aio.AbortError)."""
    code = code_for(exc)
    st = to_rich_status(exc, message=message, code=code, metadata=metadata)
    await context.abort(code, st.message, trailing_metadata(st))


# --- client side ------------------------------------------------------------------------

def _reasons() -> dict[str, type[E.EsperError]]:
    out: dict[str, type[E.EsperError]] = {}
    todo: list[type[E.EsperError]] = [E.EsperError]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.reason, cls)
        todo.extend(cls.__subclasses__())
    return out


_BY_CODE: dict[grpc.StatusCode, type[E.EsperError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: E.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: E.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: E.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: E.FailedPreconditionError,
    grpc.StatusCode.ABORTED: E.FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: E.UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.ResourceExhaustedError,
    grpc.StatusCode.CANCELLED: E.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: E.AuthError,
    grpc.StatusCode.PERMISSION_DENIED: E.PermissionDeniedError,
}


def decode_status(pairs: Iterable[tuple[str, str | bytes]] | None) -> status_pb2.Status | None:
    """The `google.rpc.Status` in a call's trailing metadata, if the server sent one."""
    for key, value in pairs or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def as_esper_error(err: grpc.RpcError) -> E.EsperError:
    """The typed error a failed call stands for.

    The class comes from `ErrorInfo.reason` when the server is Esper (so an
    `IllegalTransitionError` comes back as one), else from the status code; codes
    with no domain meaning (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...) become `EsperError`
    with the code's name as reason. `.code` holds the grpc.StatusCode,
    `.field_violations` the (field, description) pairs of a BadRequest and `.metadata`
    the ErrorInfo metadata.
    """
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    message: str = err.details() or code.name  # type: ignore[attr-defined]
    st = decode_status(err.trailing_metadata())  # type: ignore[attr-defined]
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str, str]] = []
    if st is not None:
        for any_ in st.details:
            if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_.Unpack(info)
                if info.domain == DOMAIN:
                    reason = info.reason
                    metadata = dict(info.metadata)
            elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                any_.Unpack(br)
                violations = [(v.field, v.description, v.reason) for v in br.field_violations]
    cls = _reasons().get(reason) if reason else None
    if cls is None or code_for(cls) != code:
        cls = _BY_CODE.get(code, E.EsperError)
    text = f"{code.name}: {message}"
    exc: E.EsperError
    if issubclass(cls, RequestValidationError):
        exc = cls(text, violations, message_type=metadata.get("messageType", ""))
    elif issubclass(cls, RequestDecodeError):
        size = metadata.get("size", "")
        exc = cls(text, message_type=metadata.get("messageType", ""),
                  size=int(size) if size.isdigit() else 0)
    elif issubclass(cls, E.InvalidArgumentError):
        exc = cls(text, field=violations[0][0] if violations else "")
    else:
        exc = cls(text)
    exc.reason = reason or code.name
    exc.metadata = metadata
    exc.code = code  # type: ignore[attr-defined]
    exc.field_violations = [(f, d) for f, d, _ in violations]  # type: ignore[attr-defined]
    return exc
