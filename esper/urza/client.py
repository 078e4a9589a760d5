"""The public Urza client (blocking): used by Tezzeret, Tamiyo, Tolaria and Kasmina's loader.

    with UrzaClient("127.0.0.1:50051", api_key=key) as urza:
        data = urza.get_kernel("sha256:...", timeout_s=2.0)

Every method takes `timeout_s`, an overall deadline: retries (jittered exponential
backoff, tenacity) and the waits between them all fit inside it. `get_kernel` resumes
a broken download from the last byte it received and returns bytes only after their
SHA-256 matches the record Urza sent first, so a caller never sees a truncated or
corrupt artifact. One circuit breaker guards every call: while it is OPEN calls fail at
once with `UnavailableError` (Kasmina defers germination instead of waiting).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import grpc
from tenacity import RetryCallState, Retrying, retry_if_exception
from tenacity.wait import wait_random_exponential

from esper.errors import (
    ArtifactError,
    DataLossError,
    DeadlineExceededError,
    EsperError,
    InvalidArgumentError,
    UnavailableError,
)
from esper.runtime.breaker import BreakerConfig, CircuitBreaker
from esper.runtime.client import PartClient, as_esper_error, propagate_trace_context
from esper.urza.config import MAX_CHUNK
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc

log = logging.getLogger(__name__)
T = TypeVar("T")

URZA_BREAKER = BreakerConfig(failure_rate_threshold=50.0, window_size=20, minimum_calls=10,
                             open_wait_s=0.3, half_open_calls=3, half_open_max_wait_s=0.5)
"""Short open wait: a restarted Urza is back in use within about a second. Trials that hang
(Urza restarting: the port accepts, nothing answers yet) are given up after 0.5 s so that
fresh trials find the server as soon as it serves."""

# A killed server must be found again quickly once it is back: gRPC's default reconnect
# backoff grows to minutes.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.enable_retries", 0),
    # Spread calls over every address a target resolves to (replicas behind a headless
    # Service in deploy/k8s: dns:///urza-headless...:50051); one address: no change.
    ("grpc.lb_policy_name", "round_robin"),
)
"""Options of the Urza client's plain channel (see `urza_channel`)."""
_CHANNEL_OPTIONS = CHANNEL_OPTIONS  # the old private name, still read by tolaria/worker.py
UPLOAD_CHUNK = 1 << 20


def urza_channel(target: str) -> grpc.Channel:
    """The channel `UrzaClient` uses unless given one: plain, with `CHANNEL_OPTIONS`, and
    the caller's trace context forwarded on each call.

    Plain, without gRPC's own retry policy: retries are done by the client, inside the
    deadline. With channel-level retries on, server-streaming calls to a SIGKILLed server
    were seen blocking in __next__ past their deadline (and past cancel()) in grpcio 1.85
    (tests/integration/urza/test_faults.py).
    """
    return propagate_trace_context(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))


class UrzaLibrary(Protocol):
    """What Urza's callers in other parts use (Karn's and Tezzeret's cores); `UrzaClient`
    provides it, tests pass in-memory fakes."""

    def list_blueprints(self, timeout_s: float, *, family: str = "", tags: Iterable[str] = (),
                        layout: int = 0, page_size: int = 0, page_token: str = "",
                        include_retired: bool = False
                        ) -> tuple[list[blueprint_pb2.Blueprint], str]: ...
    def get_blueprint(self, blueprint_id: str, timeout_s: float) -> blueprint_pb2.Blueprint: ...
    def put_blueprint(self, blueprint: blueprint_pb2.Blueprint, timeout_s: float
                      ) -> tuple[str, bool]: ...
    def put_kernel(self, artifact: bytes, timeout_s: float) -> tuple[str, bool]: ...
    def query_kernels(self, timeout_s: float, *, blueprint_id: str = "",
                      site: seed_pb2.SiteSignature | None = None, tags: Iterable[str] = (),
                      max_parameters: int = 0, page_size: int = 0, page_token: str = "",
                      include_retired: bool = False
                      ) -> tuple[list[kernel_pb2.KernelRecord], str]: ...


class _TransferCorrupt(ArtifactError):
    """Bytes that arrived do not match the record: retried from scratch, never returned."""

    reason = "TRANSFER_CORRUPT"


def is_breaker_failure(exc: BaseException) -> bool:
    """Errors that say Urza (or the path to it) is unhealthy, not that the caller erred."""
    if isinstance(exc, UnavailableError | DataLossError | _TransferCorrupt):
        return True
    # A bare EsperError is a status with no domain meaning (INTERNAL, UNKNOWN, ...).
    return type(exc) is EsperError or not isinstance(exc, EsperError)


def _retryable(exc: BaseException) -> bool:
    # An open breaker is final: the point is to stop calling, not to wait it out.
    if isinstance(exc, UnavailableError) and exc.reason == "CIRCUIT_OPEN":
        return False
    return isinstance(exc, UnavailableError | _TransferCorrupt)


class UrzaClient(PartClient):
    """Blocking client for `esper.urza.v1.UrzaService`; thread-safe (share one per process).

    Not on `sync_channel`: its own plain channel (`urza_channel`) and its own retry loop
    under one circuit breaker (`_call`), every call inside the caller's `timeout_s`.
    """

    part = "urza"

    def __init__(self, target: str, api_key: str | None = None, *,
                 breaker: CircuitBreaker | None = None,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.breaker = breaker or CircuitBreaker(f"urza@{target}", URZA_BREAKER)
        self._channel = channel or urza_channel(target)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("x-api-key", api_key),) if api_key else ())
        self._stub = rpc.UrzaServiceStub(self._channel)
        self.resumed_downloads = 0
        """Downloads that continued from a byte offset after a broken stream."""
        self._local = threading.local()

    def _opts(self, left: float) -> dict[str, object]:
        # A HALF_OPEN trial call waits for the channel to (re)connect within its deadline
        # instead of failing at once: right after Urza restarts, the channel may still be
        # in reconnect backoff, and a trial failed that way would keep the breaker open.
        return {"timeout": left, "metadata": self._metadata,
                "wait_for_ready": getattr(self._local, "trial", False)}

    # -- the retry loop ---------------------------------------------------------------------

    def _call(self, what: str, timeout_s: float, attempt: Callable[[float], T]) -> T:
        """Run `attempt(time_left_s)` under the breaker, retrying transient failures
        with jittered backoff until `timeout_s` has passed."""
        if timeout_s <= 0:
            raise InvalidArgumentError(f"timeout_s={timeout_s}: must be > 0", field="timeout_s")
        # Fail fast on an open breaker before any retry state is built: with many
        # fetchers polling while Urza is down, this path is most of the client's CPU.
        self.breaker.raise_if_refusing()
        deadline = time.monotonic() + timeout_s
        backoff = wait_random_exponential(multiplier=0.05, max=0.5)

        def wait(state: RetryCallState) -> float:
            return max(0.0, min(backoff(state), deadline - time.monotonic() - 0.01))

        def stop(state: RetryCallState) -> bool:
            return deadline - time.monotonic() <= 0.01

        def once() -> T:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"{what}: no time left of {timeout_s}s")
            with self.breaker.guard(is_breaker_failure) as ticket:
                self._local.trial = ticket is not None
                try:
                    return attempt(left)
                except grpc.RpcError as err:
                    raise as_esper_error(err) from err
                finally:
                    self._local.trial = False

        retrying = Retrying(retry=retry_if_exception(_retryable), wait=wait, stop=stop,
                            reraise=True)
        try:
            return retrying(once)
        except DeadlineExceededError:
            raise
        except (UnavailableError, _TransferCorrupt) as exc:
            if _retryable(exc) and time.monotonic() >= deadline - 0.01:
                raise DeadlineExceededError(
                    f"{what}: no complete answer from Urza at {self.target} within "
                    f"{timeout_s}s ({retrying.statistics.get('attempt_number', 1)} attempts; "
                    f"last: {exc})"
                ) from exc
            raise

    # -- kernels ------------------------------------------------------------------------------

    def get_kernel(self, kernel_id: str, timeout_s: float, *, chunk_size: int = 0) -> bytes:
        """The artifact bytes of a kernel, their SHA-256 checked against Urza's record.

        Raises:
            NotFoundError: Urza has no such kernel.
            UnavailableError: the breaker is open, or Urza stayed unreachable.
            DeadlineExceededError: the download did not finish within `timeout_s`.
            DataLossError: Urza's copy is corrupt (it said so; nothing is returned).
        """
        return self.get_kernel_with_record(kernel_id, timeout_s, chunk_size=chunk_size)[1]

    def get_kernel_with_record(self, kernel_id: str, timeout_s: float, *, chunk_size: int = 0
                               ) -> tuple[kernel_pb2.KernelRecord, bytes]:
        received = bytearray()
        state: dict[str, kernel_pb2.KernelRecord] = {}

        def attempt(left: float) -> tuple[kernel_pb2.KernelRecord, bytes]:
            offset = len(received)
            if offset:
                self.resumed_downloads += 1
            stream = self._stub.GetKernel(
                pb.GetKernelRequest(kernel_id=kernel_id, offset=offset, chunk_size=chunk_size),
                **self._opts(left))
            # Seen here: with the server SIGKILLed mid-stream, a streaming call's
            # __next__ can outlive its deadline; cancelling it ourselves bounds the wait.
            watchdog = threading.Timer(left + 0.05, stream.cancel)
            watchdog.daemon = True
            watchdog.start()
            try:
                return _consume(stream)
            finally:
                watchdog.cancel()

        def _consume(stream: Iterator[pb.GetKernelResponse]
                     ) -> tuple[kernel_pb2.KernelRecord, bytes]:
            for msg in stream:
                if msg.WhichOneof("part") == "info":
                    info = msg.info
                    prev = state.get("info")
                    if prev is not None and prev.artifact_sha256 != info.artifact_sha256:
                        # Not the bytes we were resuming: start over.
                        received.clear()
                        state.pop("info")
                        raise _TransferCorrupt(f"kernel {kernel_id} changed during download")
                    state["info"] = info
                    continue
                if "info" not in state or msg.chunk.offset != len(received):
                    expected = len(received)
                    received.clear()
                    state.pop("info", None)
                    raise _TransferCorrupt(
                        f"kernel {kernel_id}: chunk at offset {msg.chunk.offset} where "
                        f"{expected} was expected (or before the record)")
                received.extend(msg.chunk.data)
                if len(received) > state["info"].artifact_size:
                    received.clear()
                    state.pop("info")
                    raise _TransferCorrupt(f"kernel {kernel_id}: more bytes than its record says")
            info = state.get("info")
            if info is None or len(received) != info.artifact_size:
                raise _TransferCorrupt(
                    f"kernel {kernel_id}: stream ended at {len(received)} of "
                    f"{info.artifact_size if info else '?'} bytes")
            data = bytes(received)
            digest = hashlib.sha256(data).hexdigest()
            if digest != info.artifact_sha256:
                received.clear()
                state.pop("info")
                raise _TransferCorrupt(f"kernel {kernel_id}: received bytes hash to {digest}, "
                                       f"the record says {info.artifact_sha256}")
            return info, data

        return self._call(f"GetKernel({kernel_id})", timeout_s, attempt)

    def put_kernel(self, artifact: bytes, timeout_s: float, *, request_id: str | None = None,
                   chunk_size: int = UPLOAD_CHUNK) -> tuple[str, bool]:
        """Upload a signed artifact; returns (kernel_id, created). Idempotent by content."""
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise InvalidArgumentError(f"chunk_size={chunk_size}: must be in [1, {MAX_CHUNK}]",
                                       field="chunk_size")
        header = pb.KernelUploadHeader(request_id=request_id or str(uuid.uuid4()),
                                       total_size=len(artifact),
                                       artifact_sha256=hashlib.sha256(artifact).hexdigest())

        def messages() -> Iterator[pb.PutKernelRequest]:
            yield pb.PutKernelRequest(header=header)
            for off in range(0, len(artifact), chunk_size):
                yield pb.PutKernelRequest(chunk=artifact[off:off + chunk_size])

        resp = self._call("PutKernel", timeout_s,
                          lambda left: self._stub.PutKernel(messages(), **self._opts(left)))
        return resp.kernel_id, resp.created

    def query_kernels(self, timeout_s: float, *, blueprint_id: str = "",
                      site: seed_pb2.SiteSignature | None = None, tags: Iterable[str] = (),
                      max_parameters: int = 0, page_size: int = 0, page_token: str = "",
                      include_retired: bool = False
                      ) -> tuple[list[kernel_pb2.KernelRecord], str]:
        """Kernels of trusted signers matching every filter, best score first
        (KernelStats.score); (records, next token). A page may hold fewer than page_size
        records (replies stay under 3 MiB): page on while the token is not empty."""
        req = pb.QueryKernelsRequest(blueprint_id=blueprint_id, tags=list(tags),
                                     max_parameters=max_parameters, page_size=page_size,
                                     page_token=page_token, include_retired=include_retired)
        if site is not None:
            req.site.CopyFrom(site)
        resp = self._call("QueryKernels", timeout_s,
                          lambda left: self._stub.QueryKernels(req, **self._opts(left)))
        return list(resp.kernels), resp.next_page_token

    def delete_kernel(self, kernel_id: str, timeout_s: float, *,
                      request_id: str | None = None) -> bool:
        """Delete a kernel and its field reports; False if Urza had no such kernel."""
        req = pb.DeleteKernelRequest(request_id=request_id or str(uuid.uuid4()),
                                     kernel_id=kernel_id)
        return self._call("DeleteKernel", timeout_s,
                          lambda left: self._stub.DeleteKernel(req, **self._opts(left))).deleted

    def record_outcome(self, report: pb.FieldReport, timeout_s: float, *,
                       request_id: str | None = None) -> bool:
        """Store a field report; False if this request_id was already recorded.

        One request_id is used for every retry, so a report is recorded at most once.
        """
        req = pb.RecordOutcomeRequest(request_id=request_id or str(uuid.uuid4()), report=report)
        return self._call("RecordOutcome", timeout_s,
                          lambda left: self._stub.RecordOutcome(req, **self._opts(left))).created

    def delete_field_reports(self, timeout_s: float, *, kernel_id: str = "", run_id: str = "",
                             request_id: str | None = None) -> int:
        """Delete the field reports of a kernel, of a run, or of both; returns how many."""
        req = pb.DeleteFieldReportsRequest(request_id=request_id or str(uuid.uuid4()),
                                           kernel_id=kernel_id, run_id=run_id)
        return self._call(
            "DeleteFieldReports", timeout_s,
            lambda left: self._stub.DeleteFieldReports(req, **self._opts(left))).deleted

    # -- blueprints -----------------------------------------------------------------------------

    def put_blueprint(self, blueprint: blueprint_pb2.Blueprint, timeout_s: float
                      ) -> tuple[str, bool]:
        req = pb.PutBlueprintRequest(request_id=str(uuid.uuid4()), blueprint=blueprint)
        resp = self._call("PutBlueprint", timeout_s,
                          lambda left: self._stub.PutBlueprint(req, **self._opts(left)))
        return resp.blueprint_id, resp.created

    def get_blueprint(self, blueprint_id: str, timeout_s: float) -> blueprint_pb2.Blueprint:
        req = pb.GetBlueprintRequest(blueprint_id=blueprint_id)
        return self._call("GetBlueprint", timeout_s,
                          lambda left: self._stub.GetBlueprint(req, **self._opts(left))).blueprint

    def blueprint_status(self, blueprint_id: str, timeout_s: float) -> pb.GetBlueprintResponse:
        """The blueprint with whether (when, why) it is retired."""
        req = pb.GetBlueprintRequest(blueprint_id=blueprint_id)
        return self._call("GetBlueprint", timeout_s,
                          lambda left: self._stub.GetBlueprint(req, **self._opts(left)))

    def list_blueprints(self, timeout_s: float, *, family: str = "", tags: Iterable[str] = (),
                        layout: int = 0, page_size: int = 0, page_token: str = "",
                        include_retired: bool = False
                        ) -> tuple[list[blueprint_pb2.Blueprint], str]:
        """Blueprints by id (retired ones only with include_retired); (blueprints, next
        token). A page may hold fewer than page_size (replies stay under 3 MiB)."""
        req = pb.ListBlueprintsRequest(family=family, tags=list(tags), layout=layout,
                                       page_size=page_size, page_token=page_token,
                                       include_retired=include_retired)
        resp = self._call("ListBlueprints", timeout_s,
                          lambda left: self._stub.ListBlueprints(req, **self._opts(left)))
        return list(resp.blueprints), resp.next_page_token

    def retire_blueprint(self, blueprint_id: str, timeout_s: float, *, reason: str = "",
                         restore: bool = False, request_id: str | None = None) -> bool:
        """Retire (restore=True: un-retire) a blueprint: its kernels are still served but no
        longer offered. Returns False when it already was in that state."""
        req = pb.RetireBlueprintRequest(request_id=request_id or str(uuid.uuid4()),
                                        blueprint_id=blueprint_id, reason=reason,
                                        restore=restore)
        return self._call(
            "RetireBlueprint", timeout_s,
            lambda left: self._stub.RetireBlueprint(req, **self._opts(left))).changed

    def delete_blueprint(self, blueprint_id: str, timeout_s: float, *,
                         request_id: str | None = None) -> tuple[bool, int]:
        """Delete a blueprint, its kernels and their field reports; (deleted, kernels
        deleted)."""
        req = pb.DeleteBlueprintRequest(request_id=request_id or str(uuid.uuid4()),
                                        blueprint_id=blueprint_id)
        resp = self._call("DeleteBlueprint", timeout_s,
                          lambda left: self._stub.DeleteBlueprint(req, **self._opts(left)))
        return resp.deleted, resp.kernels_deleted


def fetcher(client: UrzaClient) -> Callable[[str, float], bytes]:
    """`fetch(kernel_id, timeout_s) -> bytes` for `esper.kasmina.loader.KernelLoader`."""
    return client.get_kernel


__all__: list[str] = ["CHANNEL_OPTIONS", "URZA_BREAKER", "UrzaClient", "UrzaLibrary", "fetcher",
                       "is_breaker_failure", "urza_channel"]
