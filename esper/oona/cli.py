"""`esper events --run <id>`: print a run's events from JetStream as they arrive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esper.errors import FailedPreconditionError
from esper.runtime.cli import ENDPOINTS_FILE  # written by `esper up`; holds "nats_url"


def nats_url_from(data_dir: Path) -> str:
    """The NATS URL of the `esper up` running with `data_dir`.

    Raises:
        FailedPreconditionError: no `esper up` is running there (no endpoints file, or no bus).
    """
    path = data_dir / ENDPOINTS_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FailedPreconditionError(
            f"{path} not found: start `esper up --data-dir {data_dir}` or pass --url nats://host:port"
        ) from exc
    url = info.get("nats_url")
    if not url:
        raise FailedPreconditionError(f"{path} names no nats_url; pass --url nats://host:port")
    return str(url)


def run(args: argparse.Namespace) -> int:
    from esper.oona.tap import tail

    url = args.url or nats_url_from(args.data_dir)
    tail(url, args.run, telemetry=args.telemetry, idle_timeout_s=args.idle_timeout)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "events", help="print a run's events from the bus (Oona) as they arrive"
    )
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--url", help="NATS URL (default: the one `esper up` in --data-dir started)")
    p.add_argument("--data-dir", type=Path, default=Path(".esper"), help="data dir of `esper up`")
    p.add_argument("--telemetry", action="store_true", help="also print health snapshots")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="exit after this many seconds without an event (default: follow until Ctrl-C)",
    )
    p.set_defaults(func=run)
