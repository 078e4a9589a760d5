"""gRPC status ↔ esper errors for Tamiyo's adapter and clients.

`esper.runtime` owns the platform-wide mapping (with `google.rpc.Status` details); when it
is importable its `as_esper_error` is used, so Tamiyo's clients raise what every client raises.
"""

from __future__ import annotations

import grpc

from esper import errors as E

STATUS_OF: tuple[tuple[type[E.EsperError], grpc.StatusCode], ...] = (
    # Most specific first: DeadlineExceededError is an UnavailableError.
    (E.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (E.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (E.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (E.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)

_ERROR_OF: dict[grpc.StatusCode, type[E.EsperError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: E.UnavailableError,
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: E.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: E.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: E.FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: E.AuthError,
    grpc.StatusCode.PERMISSION_DENIED: E.PermissionDeniedError,
}


def status_code_of(err: E.EsperError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def as_esper_error(err: grpc.RpcError, *, what: str = "call") -> E.EsperError:
    """One typed error for a failed call; the runtime's mapping when it exists."""
    try:
        from esper.runtime.client import as_esper_error as runtime_as_esper_error
    except ImportError:
        runtime_as_esper_error = None
    if runtime_as_esper_error is not None:
        return runtime_as_esper_error(err)
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _ERROR_OF.get(code, E.UnavailableError if code == grpc.StatusCode.CANCELLED else E.EsperError)
    msg = f"{what} failed with {code.name}: {details}"
    return cls(msg, reason=None if cls is not E.EsperError else code.name)
