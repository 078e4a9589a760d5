"""A stand-in run worker for supervisor tests: same command line and event-log protocol as
`esper.tolaria.worker`, but each "epoch" is a short sleep instead of training, so the
supervisor's restart / stop / watch logic can be exercised in well under a second.

Progress lives in `<run-dir>/checkpoints/progress` (the checkpoint); SIGTERM stops it at
the next epoch boundary like the real worker. With `--nats-url` its events go through the
real worker's `RunEvents` (event log first, then Oona, the delivery record before the
terminal state). `--env-dump` writes its environment to `<run-dir>/env.json`;
`--linger-s` keeps it alive after the terminal state (the real worker flushes the bus and
its traces then, for seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from esper.tolaria.runs import EventLog, new_envelope, read_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--nats-url")
    ap.add_argument("--epoch-seconds", type=float, default=0.02)
    ap.add_argument("--jobs")
    ap.add_argument("--env-dump", action="store_true")
    ap.add_argument("--linger-s", type=float, default=0.0)
    ap.add_argument("--settle-s", type=float, default=None)
    ap.add_argument("--oona-max-queue", type=int, default=10_000)
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.env_dump:
        (args.run_dir / "env.json").write_text(json.dumps(dict(os.environ)))
    cfg = read_config(args.run_dir)
    run_id = args.run_dir.name
    progress = args.run_dir / "checkpoints" / "progress"
    done = int(progress.read_text()) if progress.exists() else 0
    log = EventLog(args.run_dir / "events.log")
    emit = log.append
    publisher = None
    if args.nats_url:
        from esper.oona.publisher import Publisher
        from esper.tolaria import worker

        if args.settle_s is not None:
            worker.DELIVERY_SETTLE_S = args.settle_s
        events = worker.RunEvents(run_id, log)
        publisher = Publisher(args.nats_url, max_queue=args.oona_max_queue, connect_timeout_s=0.5,
                              on_degraded=lambda kind, detail: events.degrade("oona", kind, detail))
        events.publisher = publisher

        def emit(env, sync=False):
            events(env)

    env = new_envelope(run_id, source="tolaria", epoch=done)
    env.run_state.state = "running"
    env.run_state.detail = f"resumed after epoch {done}" if done else "started"
    emit(env, sync=True)
    for epoch in range(done + 1, cfg.epochs + 1):
        if stop.is_set():
            env = new_envelope(run_id, source="tolaria", epoch=epoch - 1)
            env.run_state.state = "stopped"
            emit(env, sync=True)
            break
        time.sleep(args.epoch_seconds)
        env = new_envelope(run_id, source="tolaria", epoch=epoch, step=epoch * 10)
        env.epoch_metrics.epoch = epoch
        env.epoch_metrics.total_epochs = cfg.epochs
        env.epoch_metrics.val_accuracy = epoch / cfg.epochs
        emit(env, sync=True)
        tmp = progress.with_suffix(".tmp")  # atomic: a SIGKILL never leaves it half-written
        tmp.write_text(str(epoch))
        os.replace(tmp, progress)
    else:
        env = new_envelope(run_id, source="tolaria", epoch=cfg.epochs)
        env.run_state.state = "succeeded"
        emit(env, sync=True)
    if publisher is not None:
        publisher.close(1.0)
    time.sleep(args.linger_s)


if __name__ == "__main__":
    main()
