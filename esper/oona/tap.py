"""Print a run's events as they arrive: `python -m esper.oona.tap --url nats://... --run <run_id>`.

Uses an ordered ephemeral consumer (no durable state is left on the server), starting
from the first stored event of the run, so a tail started late still shows the history.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TextIO

import nats
from google.protobuf import text_format
from nats.js import api

from esper.errors import InvalidArgumentError, UnavailableError
from esper.oona.connection import NatsCredentials, connect_options
from esper.oona.envelope import decode, payload_kind
from esper.oona.subjects import run_events_filter, telemetry_subject
from generated.esper.oona.v1.events_pb2 import EventEnvelope


def format_event(env: EventEnvelope, *, width: int = 160) -> str:
    """One line: sequence, epoch, step, kind and the payload in compact text form."""
    kind = payload_kind(env)
    body = text_format.MessageToString(getattr(env, kind), as_one_line=True)
    if len(body) > width:
        body = body[: width - 3] + "..."
    return f"#{env.sequence:<5} epoch {env.epoch:<3} step {env.step:<7} {kind:<15} {body}"


async def atail(
    url: str,
    run_id: str,
    *,
    out: TextIO | None = None,
    telemetry: bool = False,
    idle_timeout_s: float | None = None,
    connect_timeout_s: float = 5.0,
    credentials: NatsCredentials | None = None,
) -> int:
    """Print every event of `run_id` until no event came for `idle_timeout_s` (None: forever).

    `url` may list several servers (comma-separated); `credentials` default to
    ESPER_NATS_USER / ESPER_NATS_PASSWORD_FILE.

    Returns how many events were printed.
    Raises:
        UnavailableError: NATS could not be reached.
    """
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                **connect_options(url, credentials if credentials is not None
                                  else NatsCredentials.from_env()),
                connect_timeout=connect_timeout_s,
                max_reconnect_attempts=-1,
            ),
            connect_timeout_s,
        )
    except TimeoutError as exc:
        raise UnavailableError(f"NATS at {url} not reachable within {connect_timeout_s}s") from exc
    out = out if out is not None else sys.stdout  # looked up per call: stdout may be redirected
    printed = 0
    try:
        js = nc.jetstream()
        subjects = [run_events_filter(run_id)] + ([telemetry_subject(run_id)] if telemetry else [])
        subs = [
            await js.subscribe(s, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
            for s in subjects
        ]
        last = time.monotonic()
        while idle_timeout_s is None or time.monotonic() - last < idle_timeout_s:
            got = False
            for sub in subs:
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except (TimeoutError, nats.errors.TimeoutError):  # no message within the wait
                    continue
                got = True
                try:
                    line = format_event(decode(msg.data))
                except InvalidArgumentError as exc:
                    line = f"(undecodable message on {msg.subject}: {exc})"
                print(line, file=out, flush=True)
                printed += 1
            if got:
                last = time.monotonic()
    finally:
        await nc.close()
    return printed


def tail(
    url: str,
    run_id: str,
    *,
    out: TextIO | None = None,
    telemetry: bool = False,
    idle_timeout_s: float | None = None,
    credentials: NatsCredentials | None = None,
) -> int:
    """Synchronous `atail` (for the CLI)."""
    return asyncio.run(
        atail(url, run_id, out=out, telemetry=telemetry, idle_timeout_s=idle_timeout_s,
              credentials=credentials)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esper.oona.tap", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--run", required=True, help="run id whose events to print")
    parser.add_argument("--telemetry", action="store_true", help="also print health snapshots")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="exit after this many seconds without an event (default: follow forever)",
    )
    args = parser.parse_args(argv)
    try:
        tail(args.url, args.run, telemetry=args.telemetry, idle_timeout_s=args.idle_timeout)
    except KeyboardInterrupt:
        return 130
    except (UnavailableError, InvalidArgumentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
