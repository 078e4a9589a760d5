"""A stand-in run worker for supervisor tests: same command line and event-log protocol as
`esper.tolaria.worker`, but each "epoch" is a short sleep instead of training, so the
supervisor's restart / stop / watch logic can be exercised in well under a second.

Progress lives in `<run-dir>/checkpoints/progress` (the checkpoint); SIGTERM stops it at
the next epoch boundary like the real worker.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cfg = read_config(args.run_dir)
    run_id = args.run_dir.name
    progress = args.run_dir / "checkpoints" / "progress"
    done = int(progress.read_text()) if progress.exists() else 0
    log = EventLog(args.run_dir / "events.log")
    env = new_envelope(run_id, source="tolaria", epoch=done)
    env.run_state.state = "running"
    env.run_state.detail = f"resumed after epoch {done}" if done else "started"
    log.append(env, sync=True)
    for epoch in range(done + 1, cfg.epochs + 1):
        if stop.is_set():
            env = new_envelope(run_id, source="tolaria", epoch=epoch - 1)
            env.run_state.state = "stopped"
            log.append(env, sync=True)
            return
        time.sleep(args.epoch_seconds)
        env = new_envelope(run_id, source="tolaria", epoch=epoch, step=epoch * 10)
        env.epoch_metrics.epoch = epoch
        env.epoch_metrics.total_epochs = cfg.epochs
        env.epoch_metrics.val_accuracy = epoch / cfg.epochs
        log.append(env, sync=True)
        tmp = progress.with_suffix(".tmp")  # atomic: a SIGKILL never leaves it half-written
        tmp.write_text(str(epoch))
        os.replace(tmp, progress)
    env = new_envelope(run_id, source="tolaria", epoch=cfg.epochs)
    env.run_state.state = "succeeded"
    log.append(env, sync=True)


if __name__ == "__main__":
    main()
