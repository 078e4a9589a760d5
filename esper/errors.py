"""Typed errors for every part of Esper.

Each error names the value that was wrong and what to do. Services map them to gRPC
status codes (see `esper.runtime.errors`); clients turn a `grpc.RpcError` back into one.
"""

from __future__ import annotations

from collections.abc import Mapping


class EsperError(Exception):
    """Base of every error Esper raises on purpose.

    `reason` is a stable UPPER_SNAKE identifier (sent as `google.rpc.ErrorInfo.reason`);
    `metadata` holds the facts a client may act on, as strings under lowerCamelCase keys
    (sent as `ErrorInfo.metadata`, e.g. {"requiredScope": "urza:write"}).
    """

    reason: str = "ESPER_ERROR"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata) if metadata else {}


class ConfigError(EsperError, ValueError):
    """A configuration value or key is invalid (unknown keys included)."""

    reason = "INVALID_CONFIG"


class InvalidArgumentError(EsperError, ValueError):
    """A request field is invalid. `field` is its dotted path."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str = "", reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.field = field


class NotFoundError(EsperError, KeyError):
    reason = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(EsperError):
    reason = "ALREADY_EXISTS"


class FailedPreconditionError(EsperError):
    """The system is not in a state where the operation is allowed."""

    reason = "FAILED_PRECONDITION"


class IllegalTransitionError(FailedPreconditionError):
    """A transition the seed lifecycle does not allow (docs/ARCHITECTURE.md, "Seed lifecycle")."""

    reason = "ILLEGAL_TRANSITION"


class ArtifactError(EsperError):
    """A kernel artifact is malformed, tampered with, or fails verification."""

    reason = "ARTIFACT_INVALID"


class UntrustedKeyError(ArtifactError):
    """A kernel artifact is signed by a key that is not in the trusted set."""

    reason = "UNTRUSTED_KEY"


class BlueprintError(InvalidArgumentError):
    """A blueprint IR is invalid: unknown op, cycle, shapes that do not infer, size bounds."""

    reason = "BLUEPRINT_INVALID"


class UnavailableError(EsperError):
    """A dependency (service, bus) cannot be reached or its circuit breaker is open."""

    reason = "UNAVAILABLE"


class DeadlineExceededError(UnavailableError):
    reason = "DEADLINE_EXCEEDED"


class AuthError(EsperError):
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(EsperError):
    reason = "PERMISSION_DENIED"


class OutOfRangeError(InvalidArgumentError):
    """A position (offset, page) is past the end of what exists; maps to OUT_OF_RANGE."""

    reason = "OUT_OF_RANGE"


class ResourceExhaustedError(EsperError):
    """A quota or pool is full (e.g. Tolaria's active runs); retry once capacity frees up."""

    reason = "RESOURCE_EXHAUSTED"


class DataLossError(EsperError):
    """Stored data is gone or corrupt (e.g. a blob whose bytes no longer match its hash)."""

    reason = "DATA_LOSS"
