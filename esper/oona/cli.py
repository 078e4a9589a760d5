"""`esper events --run <id>`: print a run's events from JetStream as they arrive.
`esper streams [--replicas N]`: create or reconcile the Esper streams (as NATS admin)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from esper.errors import FailedPreconditionError
from esper.runtime.endpoints import PlatformInfo  # `esper up`'s file; holds "nats_url"

if TYPE_CHECKING:
    from esper.oona.connection import NatsCredentials


def _endpoints(data_dir: Path) -> PlatformInfo:
    info = PlatformInfo.read(data_dir)
    if info is None:
        raise FailedPreconditionError(
            f"{PlatformInfo.path(data_dir)} not found: start `esper up --data-dir {data_dir}` "
            "or pass --url nats://host:port")
    return info


def nats_url_from(data_dir: Path) -> str:
    """The NATS URL of the `esper up` running with `data_dir`.

    Raises:
        FailedPreconditionError: no `esper up` is running there (no endpoints file, or no bus).
    """
    url = _endpoints(data_dir).nats_url
    if not url:
        raise FailedPreconditionError(
            f"{PlatformInfo.path(data_dir)} names no nats_url; pass --url nats://host:port"
        )
    return str(url)


def credentials_from(data_dir: Path, role: str) -> NatsCredentials | None:
    """`role`'s credentials of the `esper up` running with `data_dir` (None: its bus has no auth)."""
    from esper.oona.auth import CredentialsDir

    directory = _endpoints(data_dir).nats_credentials_dir
    return CredentialsDir(directory).credentials(role) if directory else None


def run(args: argparse.Namespace) -> int:
    from esper.oona.connection import NatsCredentials
    from esper.oona.tap import tail

    if args.url:
        url, creds = args.url, NatsCredentials.from_env()
    else:
        url, creds = nats_url_from(args.data_dir), credentials_from(args.data_dir, "reader")
    tail(url, args.run, telemetry=args.telemetry, idle_timeout_s=args.idle_timeout,
         credentials=creds)
    return 0


def run_streams(args: argparse.Namespace) -> int:
    import asyncio

    import nats

    from esper.errors import ConfigError
    from esper.oona.connection import OonaConfig, connect_options
    from esper.oona.subjects import ensure_streams, with_replicas

    cfg = OonaConfig.from_env()
    servers = args.url or cfg.servers
    if not servers:
        raise ConfigError("no NATS URL: pass --url or set ESPER_NATS_URL")
    replicas = args.replicas if args.replicas is not None else cfg.stream_replicas

    async def main() -> dict[str, str]:
        # A cluster that has just started may not have elected its JetStream meta leader
        # yet: keep asking until --timeout.
        deadline = asyncio.get_running_loop().time() + args.timeout
        nc = await nats.connect(**connect_options(servers, cfg.credentials()),
                                connect_timeout=5, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            while True:
                try:
                    return await ensure_streams(js, with_replicas(replicas))
                except (nats.errors.Error, TimeoutError) as e:
                    if asyncio.get_running_loop().time() > deadline:
                        raise FailedPreconditionError(
                            f"could not create the streams within {args.timeout}s: {e!r}") from e
                    await asyncio.sleep(1.0)
        finally:
            await nc.close()

    for name, what in asyncio.run(main()).items():
        print(f"{name}: {what} (replicas {replicas if replicas is not None else 'kept'})")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "events", help="print a run's events from the bus (Oona) as they arrive"
    )
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--url", help="NATS URL(s) (default: the one `esper up` in --data-dir started)")
    p.add_argument("--data-dir", type=Path, default=Path(".esper"), help="data dir of `esper up`")
    p.add_argument("--telemetry", action="store_true", help="also print health snapshots")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="exit after this many seconds without an event (default: follow until Ctrl-C)",
    )
    p.set_defaults(func=run)

    s = subparsers.add_parser(
        "streams",
        help="create the Esper JetStream streams, or make them match (replicas, limits); "
             "needs the NATS admin user (ESPER_NATS_USER/ESPER_NATS_PASSWORD_FILE)",
    )
    s.add_argument("--url", help="NATS URL(s), comma-separated (default: $ESPER_NATS_URL)")
    s.add_argument("--replicas", type=int, choices=(1, 3, 5), default=None,
                   help="replicas per stream (default: $ESPER_NATS_STREAM_REPLICAS, else keep)")
    s.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to keep trying while the cluster elects its leaders")
    s.set_defaults(func=run_streams)
