"""The one service host every Esper part runs in.

    port_holder = []
    await serve([urza.create_service(ctx)], port=0, ready=port_holder.append)

hosts the specs on one grpc.aio server with `grpc.health.v1` (overall "" and one entry
per service name; Check, Watch and List), server reflection (v1alpha, which grpcurl
1.8.6 speaks) and the call pipeline of `esper.runtime.interceptors`. Every method is
registered to receive raw request bytes, so the pipeline checks the API key before it
decodes anything; health and reflection are open (no key) but decoded and access-logged
the same way, and a path no service has is UNIMPLEMENTED with an access-log line too.
Shutdown (SIGTERM/SIGINT, or
`Host.stop()`): every health entry turns NOT_SERVING, the server keeps answering for
`notice_s` so health checkers see it, then stops accepting calls, lets in-flight Esper
calls finish for up to `grace_s`, cancels what is left (long-lived streams such as
health Watch), runs the specs' on_stop hooks and returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from esper.config import from_dict
from esper.errors import ConfigError, FailedPreconditionError
from esper.runtime import tracing
from esper.runtime.auth import AuthConfig, KeyChecker
from esper.runtime.interceptors import MethodInfo, Pipeline, request_id_paths
from esper.runtime.logging import call_log
from esper.runtime.spec import ServiceSpec

log = logging.getLogger("esper.runtime")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Fixed 1 MiB receive windows per stream instead of BDP-probed ones. With probing, a client
# streaming an upload grows the window until ~100+ MB of its stream sit in this server's
# memory before the servicer reads a byte (three concurrent 200 MB PutKernel streams: +390
# MB RSS; with these options +27 MB, and no slower on loopback). Downloads are paced by the
# client's window and are not affected.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
)


@dataclass(kw_only=True, frozen=True)
class HostConfig:
    """How the host listens and shuts down."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless the service must be reachable from other machines."""
    port: int = 0
    """Port to bind; 0 picks a free one (the bound port is returned by start())."""
    grace_s: float = 3.0
    """How long in-flight calls may run after the server stops accepting new ones."""
    notice_s: float = 0.2
    """How long NOT_SERVING is visible before the server stops accepting calls."""
    tracing: bool = True
    """Make SERVER spans when the OTEL_* environment enables tracing; False: never."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must be a non-empty address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 = pick a free one), got {self.port}")
        if not 0 <= self.grace_s <= 600:
            raise ValueError(f"grace_s must be in [0, 600] seconds, got {self.grace_s}")
        if not 0 <= self.notice_s <= 60:
            raise ValueError(f"notice_s must be in [0, 60] seconds, got {self.notice_s}")


def method_table(specs: Sequence[ServiceSpec]) -> dict[str, MethodInfo]:
    """Every method of the hosted services, keyed by its gRPC path.

    Raises:
        ConfigError: a service name appears twice, is not in the descriptor pool, or a
            write method names no method of its service.
    """
    pool = descriptor_pool.Default()
    table: dict[str, MethodInfo] = {}
    seen: set[str] = set()
    for spec in specs:
        if spec.service_name in seen:
            raise ConfigError(f"service {spec.service_name} is hosted twice")
        seen.add(spec.service_name)
        try:
            svc = pool.FindServiceByName(spec.service_name)
        except KeyError as e:
            raise ConfigError(
                f"service {spec.service_name!r} of part {spec.part!r} is not a known proto service; "
                "is its generated *_pb2 module imported?"
            ) from e
        names = {m.name for m in svc.methods}
        unknown = sorted(set(spec.write_methods) - names)
        if unknown:
            raise ConfigError(f"{spec.part}: write_methods {unknown} are not methods of "
                              f"{spec.service_name}; its methods are {sorted(names)}")
        for m in svc.methods:
            path = f"/{spec.service_name}/{m.name}"
            table[path] = MethodInfo(part=spec.part, path=path, write=m.name in spec.write_methods,
                                     client_streaming=m.client_streaming, server_streaming=m.server_streaming,
                                     request_ids=request_id_paths(m.input_type))
    return table


class Health(HealthServicer):
    """grpc.health.v1 with List (grpcio-health-checking's aio servicer leaves it UNIMPLEMENTED)."""

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in sorted(self._server_status.items())})


class _Capture:
    """Stands in for a server when a generated `add_<Service>Servicer_to_server` runs."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers arrive by name through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered[service] = dict(handlers)


def _capture_handlers(spec: ServiceSpec) -> dict[str, grpc.RpcMethodHandler]:
    """Method name → handler, as the spec's generated add_* function registers them.

    Raises:
        ConfigError: the add function registered no handlers for `spec.service_name`
            (stubs generated by grpcio-tools older than 1.63 do not register by name).
    """
    return _captured(spec.part, spec.service_name, lambda server: spec.add_to_server(spec.servicer, server))


def _captured(part: str, service_name: str, add: Callable[[object], None]) -> dict[str, grpc.RpcMethodHandler]:
    cap = _Capture()
    add(cap)
    handlers = cap.registered.get(service_name)
    if not handlers:
        raise ConfigError(
            f"{part}: add_to_server registered no method handlers for {service_name} "
            f"(got {sorted(cap.registered)}); regenerate with scripts/gen_protos.py"
        )
    return handlers


def _open_methods(service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> dict[str, MethodInfo]:
    return {name: MethodInfo(part="", path=f"/{service_name}/{name}", write=False, open=True,
                             client_streaming=h.request_streaming, server_streaming=h.response_streaming)
            for name, h in handlers.items()}


class Host:
    """A grpc.aio server hosting ServiceSpecs with health, reflection and the interceptor stack."""

    def __init__(self, specs: Sequence[ServiceSpec], *, config: HostConfig | None = None,
                 auth: AuthConfig | None = None) -> None:
        if not specs:
            raise ConfigError("Host needs at least one ServiceSpec")
        self.specs = list(specs)
        self.config = config or HostConfig()
        self.auth = auth if auth is not None else AuthConfig.from_env()
        self._methods = method_table(self.specs)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.port: int | None = None

    # Counting in-flight Esper calls lets shutdown end as soon as they are done instead of
    # always waiting out the grace period for never-ending health Watch streams.
    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def start(self) -> int:
        """Bind, start, run on_start hooks, turn health SERVING; returns the bound port.

        Raises:
            FailedPreconditionError: already started, or the address cannot be bound.
        """
        if self._server is not None:
            raise FailedPreconditionError(f"host already started on port {self.port}")
        if self.auth.disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (--insecure-no-auth): every caller may call every "
                "method of %s. Never run like this outside a private machine.",
                ", ".join(s.service_name for s in self.specs),
            )
        tracer = (tracing.setup_tracing(f"esper-{'+'.join(s.part for s in self.specs)}")
                  if self.config.tracing else None)
        checker = KeyChecker(self.auth)
        pipeline = Pipeline(checker=checker, tracer=tracer, on_enter=self._enter, on_leave=self._leave)
        server = grpc.aio.server(options=SERVER_OPTIONS)

        def register(service_name: str, handlers: dict[str, grpc.RpcMethodHandler],
                     infos: dict[str, MethodInfo]) -> None:
            wrapped = {name: pipeline.wrap(h, infos[name]) for name, h in handlers.items()}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, wrapped),))
            server.add_registered_method_handlers(service_name, wrapped)

        for spec in self.specs:
            handlers = _capture_handlers(spec)
            register(spec.service_name, handlers,
                     {name: self._methods[f"/{spec.service_name}/{name}"] for name in handlers})
        names = [s.service_name for s in self.specs]
        self._health = Health()
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        health = self._health
        handlers = _captured("health", health_name, lambda s: health_pb2_grpc.add_HealthServicer_to_server(health, s))
        register(health_name, handlers, _open_methods(health_name, handlers))
        reflector = reflection.aio.ReflectionServicer([*names, health_name, reflection.SERVICE_NAME])
        handlers = _captured("reflection", reflection.SERVICE_NAME,
                             lambda s: reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, s))
        register(reflection.SERVICE_NAME, handlers, _open_methods(reflection.SERVICE_NAME, handlers))
        # Last: only paths no handler above claims reach it.
        server.add_generic_rpc_handlers((pipeline.unknown_method(),))
        addr = f"{self.config.host}:{self.config.port}"
        try:
            port = server.add_insecure_port(addr)
        except RuntimeError as e:
            raise FailedPreconditionError(f"cannot bind {addr}: {e}") from e
        if port == 0:
            raise FailedPreconditionError(f"cannot bind {addr}: is the port in use?")
        # Everything NOT_SERVING until the hooks ran: a checker must not route to a
        # service whose store is not open yet.
        await self._health.set("", NOT_SERVING)
        for n in names:
            await self._health.set(n, NOT_SERVING)
        await server.start()
        self._server, self.port = server, port
        try:
            for spec in self.specs:
                if spec.on_start is not None:
                    await spec.on_start()
        except BaseException:
            log.exception("an on_start hook failed; stopping the server")
            await server.stop(0)
            self._stopped.set()
            raise
        for n in names:
            await self._health.set(n, SERVING)
        await self._health.set("", SERVING)
        key_ids = {kid: scopes for kid, scopes in checker.key_ids()}
        log.info("serving %s on %s:%d", ", ".join(names), self.config.host, port,
                 extra={"fields": {"services": names, "port": port, "auth": not self.auth.disabled,
                                   "key_ids": key_ids}})
        return port

    async def stop(self, reason: str = "stop requested") -> None:
        """NOT_SERVING → stop accepting → drain (≤ grace_s) → on_stop hooks. Idempotent."""
        if self._server is None or self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        t0 = time.monotonic()
        assert self._health is not None
        log.info("shutting down (%s): NOT_SERVING, draining %d in-flight call(s)", reason, self._inflight)
        await self._health.enter_graceful_shutdown()
        if self.config.notice_s:
            await asyncio.sleep(self.config.notice_s)
        # stop(grace) refuses new calls at once and cancels what still runs after grace.
        stopping = asyncio.ensure_future(self._server.stop(self.config.grace_s))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.config.grace_s)
        except TimeoutError:
            log.warning("%d call(s) still running after grace %.1fs; cancelling them",
                        self._inflight, self.config.grace_s)
        await self._server.stop(0)
        await stopping
        for spec in self.specs:
            if spec.on_stop is not None:
                try:
                    await spec.on_stop()
                except Exception:
                    log.exception("on_stop hook of %s failed", spec.part)
        call_log.flush()
        log.info("stopped after %.2fs", time.monotonic() - t0)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(
    specs: Sequence[ServiceSpec],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    grace_s: float = 3.0,
    notice_s: float = 0.2,
    auth: AuthConfig | None = None,
    ready: Callable[[int], None] | None = None,
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Host `specs` until one of `stop_signals` arrives, then shut down gracefully.

    `ready(port)` is called once the services are SERVING. `auth=None` reads the keys from
    ESPER_API_KEYS / ESPER_API_KEYS_FILE (and fails without any); pass
    `AuthConfig(disabled=True)` to run without auth.
    """
    config = from_dict(HostConfig, {"host": host, "port": port, "grace_s": grace_s,
                                    "notice_s": notice_s}, what="host settings")
    h = Host(specs, config=config, auth=auth)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in stop_signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        bound = await h.start()
        if ready is not None:
            ready(bound)
        await stop.wait()
        await h.stop(f"received {received[0]}")
    finally:
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
