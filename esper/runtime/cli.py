"""Built-in subcommands: `esper serve <part>`, `esper up`, `esper status`.

`esper up` hosts every service on ONE grpc.aio server (one port, one process, one
health service with an entry per service) plus a local nats-server with JetStream whose
store lives under `<data-dir>/nats`; the server is supervised (restarted on the same port
if it dies) and refuses anonymous clients (users and 0600 password files under
`<data-dir>/nats/credentials`; Tolaria's workers publish as "tolaria", see
`esper.oona.natsd.start_embedded`). It writes `<data-dir>/endpoints.json`
(`{"pid", "endpoints": {part: "host:port"}, "services": {part: proto name}, "nats_url",
"nats_pid", "nats_credentials_dir", "api_keys_file", "auth"}`) for `esper status` and for
clients, and removes it on a clean exit.
Without ESPER_API_KEYS / ESPER_API_KEYS_FILE it creates `<data-dir>/api-keys` (mode 0600,
one key with scope "*", kept across runs) and uses that. Run workers never get those keys:
Tolaria mints each one a run token, signed with `<data-dir>/run-token.pem` (made once, 0600)
unless ESPER_RUN_TOKEN_KEY_FILE names a key.

With no config at all, `esper up` can grow a submitted run: Tezzeret, Urza and the run
workers share one trusted-keys directory (`<data-dir>/trusted_keys` unless a setting or
ESPER_TRUSTED_KEYS_DIR names one), so Urza accepts what the local Tezzeret signs, and a
run's workers ask Tezzeret for kernels of any site Urza has none for.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import secrets
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from esper.errors import ConfigError, FailedPreconditionError, UnavailableError
from esper.fsutil import pid_alive
from esper.runtime.auth import ENV_KEYS, ENV_KEYS_FILE, AuthConfig, parse_keys, with_run_tokens
from esper.runtime.config import PlatformConfig
from esper.runtime.endpoints import (  # re-exported: tolaria/client.py reads parse_endpoints here
    ENDPOINTS_FILE,
    ENV_API_KEY,
    ENV_ENDPOINTS,
    ENV_NATS_URL,
    PlatformInfo,
    parse_endpoints,
)
from esper.runtime.spec import PARTS, PlatformContext, ServiceSpec

log = logging.getLogger("esper.cli")

KEYS_FILE = "api-keys"
ENV_TRUSTED_KEYS_DIR = "ESPER_TRUSTED_KEYS_DIR"
TRUSTED_KEYS_DIR = "trusted_keys"

ENV_HELP = """\
environment (flags win over these, these over the config file):
  ESPER_DATA_DIR, ESPER_HOST, ESPER_BASE_PORT, ESPER_GRACE_S, ESPER_LOG_LEVEL
                         the platform config's data_dir, host, base_port, grace_s, log_level
  ESPER_<PART>_<KEY>     settings.<part>.<key> (YAML value), e.g. ESPER_URZA_DATABASE_URL,
                         ESPER_TOLARIA_JOBS='{my-job: my_pkg.jobs:my_job}'
  ESPER_API_KEYS         accepted API keys, '<key>=<scope>,<scope>;<key2>=*', each key at least
                         16 characters (python -c "import secrets; print(secrets.token_urlsafe(32))")
  ESPER_API_KEYS_FILE    the same, one '<key>=<scopes>' per line
  ESPER_API_KEY          the key this process sends on its own calls to other services
  ESPER_RUN_TOKEN_KEY_FILE
                         (tolaria) the Ed25519 key that signs each run worker's run token
                         (`up`: made under <data-dir> when unset)
  ESPER_RUN_TOKEN_PUBLIC_KEY_FILE
                         its public key(s), with which every service accepts run tokens
  ESPER_ENDPOINTS        (serve) where the other parts are: 'urza=host:port,tezzeret=...'
  ESPER_NATS_URL         (serve) the NATS server(s) of Oona, comma-separated; unset: events
                         only in the run logs
  ESPER_NATS_USER, ESPER_NATS_PASSWORD_FILE
                         (serve) the NATS user Oona clients log in as (`up` sets its own)
  ESPER_NATS_STREAM_REPLICAS
                         replicas of the JetStream streams a client creates (1, 3 or 5)
  ESPER_TRUSTED_KEYS_DIR kernel-signing public keys Urza and the workers trust, where Tezzeret
                         publishes its own (default: <data-dir>/trusted_keys)
  ESPER_SIGNING_KEY, ESPER_SIGNING_KEY_FILE
                         Tezzeret's Ed25519 signing key (default: created under <data-dir>)
  ESPER_NATS_SERVER      (up) the nats-server binary (default: the one the pip package ships)
  OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
  OTEL_SERVICE_NAME, OTEL_SDK_DISABLED
                         OpenTelemetry tracing (off unless an exporter or endpoint is set)
"""


def _common(p: argparse.ArgumentParser, *, data_dir_default: str | None) -> None:
    p.add_argument("--config", type=Path, help="platform config YAML (see esper.runtime.config)")
    p.add_argument("--data-dir", type=Path, default=data_dir_default, help="state directory")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--grace-s", type=float, help="drain period on SIGTERM (default 3)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="accept calls without API keys (logged loudly; private machines only)")


def _config(args: argparse.Namespace, port: int | None) -> PlatformConfig:
    cfg = PlatformConfig.load(args.config)
    return cfg.with_overrides(data_dir=args.data_dir, host=args.host, base_port=port, grace_s=args.grace_s,
                              log_level=args.log_level, insecure_no_auth=True if args.insecure_no_auth else None)


def _create(part: str, ctx: PlatformContext) -> ServiceSpec:
    module = importlib.import_module(f"esper.{part}.service")
    spec = module.create_service(ctx)
    if not isinstance(spec, ServiceSpec) or spec.part != part:
        raise ConfigError(f"esper.{part}.service.create_service returned {spec!r}, not a ServiceSpec for {part!r}")
    return spec


def _run_host(specs: list[ServiceSpec], cfg: PlatformConfig, auth: AuthConfig, port: int,
              ready: Any) -> None:
    from esper.runtime.host import serve

    asyncio.run(serve(specs, host=cfg.host, port=port, grace_s=cfg.grace_s, auth=auth, ready=ready))


# --- esper serve ---------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from esper.runtime.logging import configure_logging

    cfg = _config(args, args.port)
    configure_logging(cfg.log_level)
    auth = AuthConfig.from_env(disabled=cfg.insecure_no_auth)
    ctx = PlatformContext(
        data_dir=cfg.data_dir,
        endpoints=parse_endpoints(os.environ.get(ENV_ENDPOINTS, "")),
        api_key=os.environ.get(ENV_API_KEY) or None,
        nats_url=os.environ.get(ENV_NATS_URL) or None,
        settings={k: dict(v) for k, v in cfg.settings.items()},
    )
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    spec = _create(args.part, ctx)

    def ready(port: int) -> None:
        print(f"{args.part} serving {spec.service_name} on {cfg.host}:{port}", flush=True)

    _run_host([spec], cfg, auth, cfg.base_port, ready)
    return 0


# --- esper up -----------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _platform_keys(cfg: PlatformConfig) -> tuple[AuthConfig, str | None, Path | None]:
    """(auth, key for the services' own calls, keys file written here or None)."""
    if cfg.insecure_no_auth:
        return AuthConfig(disabled=True), None, None
    if os.environ.get(ENV_KEYS) or os.environ.get(ENV_KEYS_FILE):
        auth = AuthConfig.from_env()
        own = os.environ.get(ENV_API_KEY)
        if not own:
            # The services call each other; give them a key of their own for this run only.
            own = secrets.token_urlsafe(32)
            auth = AuthConfig(keys={**auth.keys, own: frozenset({"*"})})
        return auth, own, None
    path = cfg.data_dir / KEYS_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# Created by `esper up`: an admin key for this data dir.\n{secrets.token_urlsafe(32)}=*\n")
    keys = parse_keys(path.read_text(), source=str(path), separator="\n")
    admin = next((k for k, scopes in keys.items() if "*" in scopes), None)
    if admin is None:
        raise ConfigError(f"{path} has no key with scope '*'; add one or delete the file to get a new one")
    return AuthConfig(keys=keys), admin, path


def shared_trust(cfg: PlatformConfig, env: dict[str, str] | None = None) -> PlatformConfig:
    """One trusted-keys directory for every part of an embedded platform.

    Tezzeret publishes its public key to its `trusted_keys_dir` (else ESPER_TRUSTED_KEYS_DIR,
    else `<data-dir>/trusted_keys`); Urza trusts its own `trusted_keys_dir` (else the
    variable, else no signer at all); the workers read `--trusted-keys` (else the variable,
    else `<data-dir>/trusted_keys`). Left alone, a config-less `esper up` would have Urza
    refuse every kernel Tezzeret signs. Whatever directory the config or the environment
    names wins; only the parts that name none are pointed at it.
    """
    env = dict(os.environ) if env is None else env
    settings = {k: dict(v) for k, v in cfg.settings.items()}
    tz, urza, tol = (settings.setdefault(p, {}) for p in ("tezzeret", "urza", "tolaria"))
    chosen = (tz.get("trusted_keys_dir") or urza.get("trusted_keys_dir")
              or env.get(ENV_TRUSTED_KEYS_DIR) or str((cfg.data_dir / TRUSTED_KEYS_DIR).resolve()))
    tz.setdefault("trusted_keys_dir", chosen)
    urza.setdefault("trusted_keys_dir", chosen)
    worker_args = [str(a) for a in tol.get("worker_args", [])]
    if "--trusted-keys" not in worker_args:
        tol["worker_args"] = [*worker_args, "--trusted-keys", urza["trusted_keys_dir"]]
    for d in {tz["trusted_keys_dir"], urza["trusted_keys_dir"]}:
        # Urza opens its trust store before Tezzeret has published into it.
        Path(d).mkdir(parents=True, exist_ok=True)
    return replace(cfg, settings=settings)


def cmd_up(args: argparse.Namespace) -> int:
    from esper.oona.natsd import embedded as embedded_nats
    from esper.runtime.logging import configure_logging

    cfg = _config(args, args.base_port)
    cfg = shared_trust(cfg)
    configure_logging(cfg.log_level)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    endpoints_path = PlatformInfo.path(cfg.data_dir)
    running = PlatformInfo.read(cfg.data_dir)
    if running is not None:
        other = running.pid
        if isinstance(other, int) and pid_alive(other):
            raise FailedPreconditionError(
                f"esper up (pid {other}) already runs with data dir {cfg.data_dir}; "
                "stop it first or choose another --data-dir")
    auth, own_key, keys_file = _platform_keys(cfg)
    # Run workers get run tokens, never these keys (esper.runtime.auth, run credentials).
    auth = with_run_tokens(auth, cfg.data_dir)
    port = cfg.base_port or _free_port(cfg.host)
    target = f"{cfg.host}:{port}"

    with embedded_nats(cfg.data_dir / "nats") as nats:
        # The run workers Tolaria spawns inherit this environment: they log in as "tolaria".
        os.environ.update(nats.credentials.client_env("tolaria"))
        ctx = PlatformContext(
            data_dir=cfg.data_dir,
            endpoints={part: target for part in PARTS},
            api_key=own_key,
            nats_url=nats.url,
            settings={k: dict(v) for k, v in cfg.settings.items()},
        )
        specs = [_create(part, ctx) for part in PARTS]

        def ready(bound: int) -> None:
            PlatformInfo(
                pid=os.getpid(),
                endpoints={s.part: f"{cfg.host}:{bound}" for s in specs},
                services={s.part: s.service_name for s in specs},
                nats_url=nats.url,
                nats_pid=nats.pid,
                nats_credentials_dir=str(nats.credentials.directory.resolve()),
                api_keys_file=str(keys_file.resolve()) if keys_file else None,
                auth=not auth.disabled,
            ).write(cfg.data_dir)
            width = max(len(p) for p in PARTS)
            for s in specs:
                print(f"{s.part:<{width}}  {cfg.host}:{bound}  {s.service_name}")
            print(f"{'nats':<{width}}  {nats.url}  (JetStream, store {nats.store_dir}; "
                  f"supervised; users in {nats.credentials.directory})")
            if keys_file is not None:
                print(f"api keys: {keys_file} (send one as 'x-api-key' metadata)")
            elif auth.disabled:
                print("api keys: NONE — authentication is disabled")
            print(f"endpoints: {endpoints_path}", flush=True)

        try:
            _run_host(specs, cfg, auth, port, ready)
        finally:
            endpoints_path.unlink(missing_ok=True)
    return 0


# --- esper status -------------------------------------------------------------------------

def _status_targets(data_dir: Path) -> dict[str, tuple[str, str]]:
    """part → (target, proto service name), from endpoints.json or ESPER_ENDPOINTS."""
    info = PlatformInfo.read(data_dir)
    if info is not None:
        return {p: (t, info.services[p]) for p, t in info.endpoints.items()}
    path = PlatformInfo.path(data_dir)
    env = os.environ.get(ENV_ENDPOINTS)
    if env:
        names = {p: f"esper.{p}.v1.{p.capitalize()}Service" for p in PARTS}
        return {p: (t, names[p]) for p, t in parse_endpoints(env).items()}
    raise UnavailableError(f"no {path} (is `esper up --data-dir {data_dir}` running?) and no {ENV_ENDPOINTS} set")


def cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    targets = _status_targets(args.data_dir)
    worst = 0
    width = max(len(p) for p in targets)
    channels: dict[str, grpc.Channel] = {}
    try:
        for part, (target, service) in targets.items():
            ch = channels.setdefault(target, grpc.insecure_channel(target))
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=args.timeout)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                state = f"UNREACHABLE ({e.code().name}: {e.details()})"
            if state != "SERVING":
                worst = 1
            print(f"{part:<{width}}  {target:<21}  {state}")
    finally:
        for ch in channels.values():
            ch.close()
    for url, nats_dir in _status_nats(args.data_dir):
        from esper.oona.natsd import describe

        state = describe(url, nats_dir, timeout=args.timeout)
        if not state.startswith("SERVING"):
            worst = 1
        print(f"{'nats':<{width}}  {url.split('://', 1)[-1]:<21}  {state}")
    return worst


def _status_nats(data_dir: Path) -> list[tuple[str, Path | None]]:
    """NATS URLs to probe: esper up's (with its supervisor state) or ESPER_NATS_URL's."""
    info = PlatformInfo.read(data_dir)
    if info is not None:
        return [(info.nats_url, data_dir / "nats")] if info.nats_url else []
    return [(u.strip(), None) for u in os.environ.get(ENV_NATS_URL, "").split(",") if u.strip()]


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="host one service", epilog=ENV_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=PARTS)
    p.add_argument("--port", type=int, help="port to bind (default 0: pick a free one)")
    _common(p, data_dir_default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "up", help="every service in one process on loopback, plus nats-server",
        description="Every service on one gRPC server on loopback, plus a nats-server with "
                    "JetStream; works with no config at all (API key created under the data "
                    "dir, one trusted-keys directory for Tezzeret, Urza and the workers, "
                    "kernels compiled on demand for each run's sites).",
        epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-port", type=int, help="port of the one gRPC server (default 0: pick a free one)")
    _common(p, data_dir_default=".esper")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="health of each service (exit 1 unless all SERVING)")
    p.add_argument("--data-dir", type=Path, default=Path(".esper"))
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per health check")
    p.set_defaults(func=cmd_status)


__all__ = ["ENDPOINTS_FILE", "ENV_API_KEY", "ENV_ENDPOINTS", "ENV_HELP", "ENV_NATS_URL", "KEYS_FILE",
           "cmd_serve", "cmd_status", "cmd_up", "parse_endpoints", "register_cli", "shared_trust"]
