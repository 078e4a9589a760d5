"""StartRun → the run is running → its first epoch is done, spawned workers vs forked ones.

For each launcher (`spawn`: a fresh interpreter per run, Tolaria's behaviour before the
fork server; `fork`: forked from the preloaded helper, the default) this starts a plain
`esper up` on a fresh data dir (no config file), waits until it serves (and, for `fork`,
until the helper is preloaded), then submits `--runs` short runs of `--job` one after the
other and reads the times from each run's own events (`emitted_at`, same host clock):

* StartRun: the RPC's round trip;
* → running: StartRun sent → the worker's `run_state "running"` event (job built, model
  wrapped, controller and Urza clients ready);
* → epoch 1: StartRun sent → the first `epoch_metrics` event.

The first run of each platform also starts Tezzeret's on-demand compile of the job's
sites (kernels the later runs find in Urza), so it is reported on its own row.

    python benchmarks/startrun_latency.py [--runs 5] [--job mnist1d] [--launchers spawn,fork]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from esper.tolaria.client import TolariaClient, find_platform
from esper.tolaria.config import RunConfig


def _ts(env) -> float:
    return env.emitted_at.seconds + env.emitted_at.nanos / 1e9


def start_platform(data_dir: Path, launcher: str, timeout_s: float = 180.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "OTEL_"))}
    env["ESPER_TOLARIA_SUPERVISOR"] = json.dumps({"launcher": launcher})
    log = open(data_dir.parent / f"up-{launcher}.log", "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen([sys.executable, "-m", "esper.cli", "up", "--data-dir", str(data_dir),
                             "--log-level", "INFO"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    log_path = data_dir.parent / f"up-{launcher}.log"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"esper up exited: {log_path.read_text()[-2000:]}")
        serving = (data_dir / "endpoints.json").exists()
        ready = launcher != "fork" or "fork server pid" in log_path.read_text(errors="replace")
        if serving and ready:
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"esper up not ready within {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.2)


def one_run(tolaria: TolariaClient, cfg: RunConfig) -> dict[str, float]:
    t0 = time.time()
    run = tolaria.start_run(cfg)
    rpc_s = time.time() - t0
    running = first = None
    for env in tolaria.watch(run.run_id):
        kind = env.WhichOneof("payload")
        if kind == "run_state" and env.run_state.state == "running" and running is None:
            running = _ts(env) - t0
        elif kind == "epoch_metrics" and first is None:
            first = _ts(env) - t0
        elif kind == "run_state" and env.run_state.state in ("failed", "stopped"):
            raise SystemExit(f"run {run.run_id} {env.run_state.state}: {env.run_state.detail}")
    assert running is not None and first is not None
    return {"rpc": rpc_s, "running": running, "epoch1": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--job", default="mnist1d")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--launchers", default="spawn,fork")
    args = ap.parse_args(argv)
    cfg = RunConfig.from_dict({"job": args.job, "epochs": args.epochs, "checkpoint_every": 0,
                               "controller": "heuristic"})
    rows = []
    with tempfile.TemporaryDirectory(prefix="esper-startrun-") as tmp:
        for launcher in args.launchers.split(","):
            data_dir = Path(tmp) / launcher / "state"
            data_dir.mkdir(parents=True)
            proc = start_platform(data_dir, launcher)
            try:
                p = find_platform(data_dir=data_dir, env={})
                with TolariaClient(p.target, p.api_key) as tolaria:
                    results = [one_run(tolaria, cfg) for _ in range(args.runs)]
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            rows.append((launcher, "first run", [results[0]]))
            if len(results) > 1:
                rows.append((launcher, f"runs 2-{len(results)}", results[1:]))
    print(f"\nStartRun latency, job {args.job} ({args.epochs} epochs, heuristic over gRPC), "
          f"{os.cpu_count()} CPU cores; seconds, median (max) over the runs\n")
    print("| launcher | runs | StartRun RPC | StartRun → running | StartRun → epoch 1 |")
    print("|---|---|---|---|---|")
    for launcher, which, rs in rows:
        cells = []
        for key in ("rpc", "running", "epoch1"):
            vals = [r[key] for r in rs]
            cells.append(f"{statistics.median(vals):.3f} ({max(vals):.3f})")
        print(f"| {launcher} | {which} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
