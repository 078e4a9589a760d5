"""`esper demo`: the embedded platform grows a model on MNIST-1D, live, and writes a report.

1. Starts the platform exactly as `esper up` does (every service in one process on
   loopback, a local nats-server with JetStream), with Tezzeret told to compile the
   built-in blueprint catalog for the demo run's seed sites at first start.
2. Waits until Urza holds a signed kernel for every site.
3. Submits a run over gRPC (`TolariaService.StartRun`): MNIST-1D, a tiny CNN, the
   heuristic controller (Tamiyo over gRPC), a cosine schedule that decays to 0.
4. Follows `WatchRun`: a progress bar per epoch and a line per seed lifecycle event.
5. Writes `report.md` and its PNG plots (esper.tolaria.report) from the run's events.

Nothing in the report is computed anywhere but from the events the run emitted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.errors import ConfigError, UnavailableError

ENDPOINTS_FILE = "endpoints.json"


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """What the demo runs."""

    out_dir: Path
    """Where the platform's state, its log and the report go."""
    task: str = "mnist1d"
    """Task name (esper.tasks)."""
    host: str = "cnn"
    """Host model of the task."""
    epochs: int = 30
    """Training epochs; the cosine schedule reaches 0 at the last one."""
    seed: int = 0
    """Run seed (data split, initialisation, batch order)."""
    max_seeds: int = 2
    """Seeds the controller may germinate."""
    platform_timeout_s: float = 180.0
    """How long to wait for the platform to serve and its kernels to be compiled."""

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 10000:
            raise ConfigError(f"epochs={self.epochs!r}: must be in [1, 10000]")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: must be >= 0")
        if not 0 <= self.max_seeds <= 1024:
            raise ConfigError(f"max_seeds={self.max_seeds!r}: must be in [0, 1024]")
        if self.platform_timeout_s <= 0:
            raise ConfigError(f"platform_timeout_s={self.platform_timeout_s!r}: must be > 0")

    def task_defaults(self) -> dict[str, Any]:
        """The growth benchmark's settings for this task and host (learning rate, heuristic,
        catalog): the demo shows the configuration whose numbers the README reports. Another
        host than the benchmark's gets the platform defaults and the whole catalog."""
        from esper.tolaria.bench_growth import TASK_DEFAULTS

        defaults = TASK_DEFAULTS.get(self.task, {})
        return defaults if defaults.get("host") == self.host else {}

    def run_config(self) -> Any:
        from esper.tolaria.config import RunConfig

        lr = self.task_defaults().get("optimizer", {}).get("learning_rate", 0.01)
        return RunConfig.from_dict({
            "task": self.task, "host": self.host, "controller": "heuristic", "epochs": self.epochs,
            "seed": self.seed, "batch_size": 64, "checkpoint_every": 5, "decide_timeout_s": 1.0,
            "budget": {"max_seeds": self.max_seeds, "max_added_parameters": 0},
            "optimizer": {"name": "adamw", "learning_rate": lr, "schedule": "cosine"},
            "labels": {"launched_by": "esper demo"},
        })


class EmbeddedPlatform:
    """`esper up` as a child process; `endpoints`, `api_key` and `nats_url` once it serves."""

    def __init__(self, data_dir: Path, settings: dict[str, Any], log_path: Path) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, str] = {}
        self.api_key: str | None = None
        self.nats_url: str | None = None

    def start(self, timeout_s: float) -> EmbeddedPlatform:
        import yaml

        from esper.runtime.auth import parse_keys

        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.data_dir / "platform.yaml"
        cfg_path.write_text(yaml.safe_dump({"settings": self.settings}, sort_keys=False))
        info_path = self.data_dir / ENDPOINTS_FILE
        info_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "esper.cli", "up", "--config", str(cfg_path),
                 "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while not info_path.exists():
            if self.proc.poll() is not None:
                raise UnavailableError(
                    f"`esper up` exited with {self.proc.returncode} before serving; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise UnavailableError(f"`esper up` did not serve within {timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.2)
        info = json.loads(info_path.read_text())
        self.endpoints = dict(info["endpoints"])
        self.nats_url = info.get("nats_url")
        if info.get("api_keys_file"):
            keys_file = Path(info["api_keys_file"])
            keys = parse_keys(keys_file.read_text(), source=str(keys_file), separator="\n")
            self.api_key = next(k for k, scopes in keys.items() if "*" in scopes)
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM: NOT_SERVING → drain → the run supervisor checkpoints its workers → exit.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _site_settings(signatures: dict[str, Any]) -> list[dict[str, Any]]:
    from esper.blueprints.ir import layout_name

    out, seen = [], set()
    for sig in signatures.values():
        entry = {"layout": layout_name(sig.layout), "channels": int(sig.channels),
                 "spatial": [int(s) for s in sig.spatial]}
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def wait_for_kernels(urza: Any, signatures: dict[str, Any], timeout_s: float) -> dict[str, int]:
    """Poll Urza until every site has at least one kernel; slot id → kernels available."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {slot: len(urza.query_kernels(5.0, site=sig, page_size=100)[0])
                  for slot, sig in signatures.items()}
        if all(counts.values()):
            return counts
        if time.monotonic() > deadline:
            raise UnavailableError(
                f"Tezzeret compiled no kernel for sites {[s for s, n in counts.items() if not n]} "
                f"within {timeout_s:.0f}s")
        time.sleep(1.0)


_STAGE_WORDS = {
    "SEED_STAGE_GERMINATED": ("germinated", "green"),
    "SEED_STAGE_TRAINING": ("training (incubator)", "cyan"),
    "SEED_STAGE_BLENDING": ("blending in", "cyan"),
    "SEED_STAGE_HOLDING": ("holding at alpha 1", "cyan"),
    "SEED_STAGE_FOSSILIZED": ("fossilized (kept)", "bold blue"),
    "SEED_STAGE_PRUNED": ("pruned", "red"),
    "SEED_STAGE_EMBARGOED": ("embargoed", "dim"),
    "SEED_STAGE_RESETTING": ("resetting", "dim"),
    "SEED_STAGE_DORMANT": ("dormant again", "dim"),
}


def follow_run(stub: Any, run_id: str, total_epochs: int, console: Any) -> list[Any]:
    """Stream the run's events with a progress bar; returns every event."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from generated.esper.common.v1 import seed_pb2
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    events = []
    with Progress(TextColumn("[bold]epoch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=console) as progress:
        bar = progress.add_task("train", total=total_epochs, status="starting the worker")
        for resp in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
            env = resp.event
            events.append(env)
            kind = env.WhichOneof("payload")
            if kind == "epoch_metrics":
                m = env.epoch_metrics
                progress.update(bar, completed=m.epoch, status=(
                    f"val acc {100 * m.val_accuracy:5.1f}%  loss {m.val_loss:.3f}  "
                    f"params {m.parameters:,}  control {m.control_ms:.1f} ms"))
            elif kind == "lifecycle":
                lc = env.lifecycle
                words, style = _STAGE_WORDS.get(seed_pb2.SeedStage.Name(lc.to_stage), ("?", ""))
                why = f" — {lc.reason}" if lc.reason else ""
                progress.console.print(
                    f"  epoch {env.epoch:>3}  seed [bold]{lc.slot_id}[/]: [{style}]{words}[/]{why}")
            elif kind == "degradation":
                d = env.degradation
                progress.console.print(f"  epoch {env.epoch:>3}  [yellow]degraded[/] {d.component}: "
                                       f"{d.kind} ({d.detail[:120]})")
            elif kind == "run_state":
                progress.update(bar, status=f"run {env.run_state.state}")
    return events


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo; returns the report's path."""
    from rich.console import Console

    console = Console()
    t0 = time.monotonic()
    out = cfg.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.run_config()
    console.print(f"[bold]esper demo[/] → {out}")

    from esper.tolaria.kernels import site_signatures

    signatures = site_signatures(run_cfg)
    console.print(f"seed sites of {run_cfg.task}/{run_cfg.host}: {', '.join(signatures)}")
    data_dir = out / "platform"
    defaults = cfg.task_defaults()
    settings = {
        "tezzeret": {"catalog_sites": _site_settings(signatures), "benchmark_iters": 5,
                     "catalog_blueprints": list(defaults.get("blueprints", ()))},
        "tamiyo": {"policy": "heuristic", "heuristic": dict(defaults.get("heuristic", {}))},
        "urza": {"trusted_keys_dir": str(data_dir / "trusted_keys")},
    }
    # Tezzeret writes its public key here at start; Urza and the workers trust what is here.
    (data_dir / "trusted_keys").mkdir(parents=True, exist_ok=True)
    platform = EmbeddedPlatform(data_dir, settings, out / "platform.log")
    console.print("starting the embedded platform (`esper up`: all services + nats-server) ...")
    platform.start(cfg.platform_timeout_s)
    try:
        return _submit_and_report(cfg, run_cfg, platform, signatures, console, out, t0)
    finally:
        console.print("stopping the platform ...")
        platform.stop()


def _submit_and_report(cfg: DemoConfig, run_cfg: Any, platform: EmbeddedPlatform, signatures: dict[str, Any],
                       console: Any, out: Path, t0: float) -> Path:
    from esper.runtime.client import sync_channel
    from esper.tolaria.report import write_report
    from esper.urza.client import UrzaClient
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
    from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

    for part, target in sorted(platform.endpoints.items()):
        console.print(f"  {part:<9} {target}")
    console.print(f"  nats      {platform.nats_url}")
    with UrzaClient(platform.endpoints["urza"], platform.api_key) as urza:
        counts = wait_for_kernels(urza, signatures, cfg.platform_timeout_s)
    console.print("kernels signed by Tezzeret and stored in Urza: "
                  + ", ".join(f"{slot}: {n}" for slot, n in counts.items()))
    channel = sync_channel(platform.endpoints["tolaria"], api_key=platform.api_key, default_timeout_s=30.0)
    try:
        stub = rpc.TolariaServiceStub(channel)
        run = stub.StartRun(pb.StartRunRequest(request_id=str(uuid.uuid4()), config=run_cfg.to_proto())).run
        console.print(f"run [bold]{run.run_id}[/]: {run_cfg.task}/{run_cfg.host}, {run_cfg.epochs} epochs, "
                      f"heuristic controller over gRPC, up to {run_cfg.budget.max_seeds} seeds")
        events = follow_run(stub, run.run_id, run_cfg.epochs, console)
        final = stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).run
    finally:
        channel.close()
    report = write_report(events, out / "report", title=f"Esper demo: {run_cfg.task} / {run_cfg.host} "
                          "grown by the heuristic controller")
    state = pb.RunState.Name(final.state).removeprefix("RUN_STATE_").lower()
    console.print(f"run {state}: {final.detail}")
    console.print(f"[bold green]report:[/] {report}  ({time.monotonic() - t0:.0f} s in all)")
    return report


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="grow a model on MNIST-1D through the embedded platform; writes a report")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: ./esper-demo-<time>)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--host", default="cnn", help="host model: cnn or mlp (default cnn)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    out = args.out or Path(f"esper-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = DemoConfig(out_dir=out, epochs=args.epochs, seed=args.seed, host=args.host)
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parser = argparse.ArgumentParser(prog="python -m esper.demo")
    register_cli(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["demo", *sys.argv[1:]])
    sys.exit(ns.func(ns))
