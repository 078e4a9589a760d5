"""JetStream publish+ack latency and Publisher cost, per nats-server sync setting.

Run: .venv/bin/python benchmarks/oona_publish.py [--n 2000]

For each sync setting (Esper's `always`, a 1 s interval, and nats-server's default of
2 minutes as the baseline) it starts a fresh nats-server with JetStream file storage and
measures on a real envelope (an EpochMetrics event, ~100 bytes):
  * publish+ack: one `js.publish` awaited at a time (p50/p99 in ms);
  * Publisher.publish(): what the training thread pays per call (µs), and
  * Publisher throughput: envelopes acknowledged per second with pipelining.
Ratios are against the 2-minute default measured in the same run. The settings are
measured in alternating rounds (fresh server each time) so that load from other processes
on a shared machine spreads over all of them; latencies are pooled over rounds and the
throughput is the median round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from esper.oona.envelope import encode, headers_for, make_envelope, subject_for
from esper.oona.natsd import NatsServer, NatsServerConfig
from esper.oona.publisher import Publisher
from esper.oona.subjects import ensure_streams
from generated.esper.oona.v1 import events_pb2 as ev


def envelope(i: int) -> ev.EventEnvelope:
    return make_envelope(
        ev.EpochMetrics(
            epoch=i,
            total_epochs=30,
            train_loss=0.5,
            val_loss=0.6,
            val_accuracy=0.8,
            parameters=12345,
            alphas={"body.1": 0.5},
        ),
        run_id="bench",
        source="bench",
        epoch=i,
        sequence=i,
    )


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def ack_latencies(url: str, n: int) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    out = []
    for i in range(n + 100):
        env = envelope(i)
        data, subject, headers = encode(env), subject_for(env), headers_for(env)
        t0 = time.perf_counter()
        await js.publish(subject, data, headers=headers)
        if i >= 100:  # warm-up
            out.append((time.perf_counter() - t0) * 1e3)
    await nc.close()
    return out


def publisher_costs(url: str, n: int) -> tuple[list[float], float]:
    envs = [envelope(i) for i in range(n)]
    with Publisher(url) as pub:
        assert pub.flush(10)
        calls = []
        t_start = time.perf_counter()
        for env in envs:
            t0 = time.perf_counter()
            pub.publish(env)
            calls.append((time.perf_counter() - t0) * 1e6)
        assert pub.flush(120), pub.stats()
        rate = n / (time.perf_counter() - t_start)
        assert pub.stats().dropped == 0
    return calls, rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="publishes per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = [
        ("2m (nats default, baseline)", "2m"),
        ("1s", "1s"),
        ("always (Esper default)", "always"),
    ]
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {
        s[0]: ([], [], []) for s in settings
    }
    for _ in range(args.rounds):
        for label, sync in settings:
            with (
                tempfile.TemporaryDirectory(dir=Path(__file__).parent) as d,
                NatsServer(Path(d), config=NatsServerConfig(sync_interval=sync)) as server,
            ):
                lat = asyncio.run(ack_latencies(server.url, args.n))
                calls, rate = publisher_costs(server.url, args.n)
            samples[label][0].extend(lat)
            samples[label][1].extend(calls)
            samples[label][2].append(rate)
    rows = {
        label: (
            statistics.median(lat),
            pct(lat, 0.99),
            statistics.median(calls),
            pct(calls, 0.99),
            statistics.median(rates),
        )
        for label, (lat, calls, rates) in samples.items()
    }
    base = rows[settings[0][0]]
    print(
        f"JetStream publish+ack, file storage (ext4 under the repo), {args.rounds} rounds x "
        f"{args.n} publishes per setting"
    )
    print(
        f"{'sync_interval':<30} {'ack p50 ms':>10} {'ack p99 ms':>10} {'p50 ratio':>9} "
        f"{'publish() p50 µs':>16} {'p99 µs':>8} {'Publisher msg/s':>15} {'rate ratio':>10}"
    )
    for label, (p50, p99, c50, c99, rate) in rows.items():
        print(
            f"{label:<30} {p50:>10.3f} {p99:>10.3f} {p50 / base[0]:>8.2f}x "
            f"{c50:>16.1f} {c99:>8.1f} {rate:>15.0f} {rate / base[4]:>9.2f}x"
        )


if __name__ == "__main__":
    main()
