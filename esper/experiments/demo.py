"""`esper demo`: the embedded platform grows a model on MNIST-1D, live, and writes a report.

1. Starts the platform exactly as `esper up` does (every service in one process on
   loopback, a local nats-server with JetStream), with no config file: only the growth
   benchmark's controller settings travel as ESPER_TAMIYO_* / ESPER_TEZZERET_* variables,
   so that the demo shows the configuration whose numbers the README reports.
2. Submits a run of the registered job `mnist1d` over gRPC (`TolariaService.StartRun`):
   a tiny CNN, the heuristic controller (Tamiyo over gRPC), a cosine schedule that
   decays to 0. Urza starts empty: the run's worker asks Tezzeret for kernels for its
   seed sites, which are compiled, signed and stored on demand while the first epoch runs.
3. Follows `WatchRun`: a progress bar per epoch and a line per seed lifecycle event.
4. Writes `report.md` and its PNG plots (esper.tolaria.report) from the run's events.

Nothing in the report is computed anywhere but from the events the run emitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.errors import ConfigError
from esper.runtime.embedded import EmbeddedPlatform


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """What the demo runs."""

    out_dir: Path
    """Where the platform's state, its log and the report go."""
    task: str = "mnist1d"
    """Registered job to train (a built-in task)."""
    host: str = "cnn"
    """Host model of the job (its `host` parameter)."""
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
        from esper.experiments.growth import TASK_DEFAULTS

        defaults = TASK_DEFAULTS.get(self.task, {})
        return defaults if defaults.get("host") == self.host else {}

    def run_config(self) -> Any:
        from esper.tolaria.config import RunConfig

        lr = self.task_defaults().get("optimizer", {}).get("learning_rate", 0.01)
        return RunConfig.from_dict({
            "job": self.task, "job_params": {"host": self.host}, "controller": "heuristic",
            "epochs": self.epochs,
            "seed": self.seed, "batch_size": 64, "checkpoint_every": 5, "decide_timeout_s": 1.0,
            "budget": {"max_seeds": self.max_seeds, "max_added_parameters": 0},
            "optimizer": {"name": "adamw", "learning_rate": lr, "schedule": "cosine"},
            "labels": {"launched_by": "esper demo"},
        })


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo; returns the report's path."""
    from rich.console import Console

    console = Console()
    t0 = time.monotonic()
    out = cfg.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.run_config()
    console.print(f"[bold]esper demo[/] → {out}")
    platform = EmbeddedPlatform(out / "platform", benchmark_settings(cfg), out / "platform.log")
    console.print("starting the embedded platform (`esper up`, no config file: all services + "
                  "nats-server) ...")
    platform.start(cfg.platform_timeout_s)
    try:
        return _submit_and_report(run_cfg, platform, console, out, t0)
    finally:
        console.print("stopping the platform ...")
        platform.stop()


def benchmark_settings(cfg: DemoConfig) -> dict[str, str]:
    """The growth benchmark's Tamiyo and Tezzeret settings for the demo's job, as the
    `ESPER_<PART>_<KEY>` variables `esper up` reads (the platform works without them)."""

    defaults = cfg.task_defaults()
    env = {"ESPER_TAMIYO_POLICY": "heuristic", "ESPER_TEZZERET_BENCHMARK_ITERS": "5"}
    if defaults.get("heuristic"):
        env["ESPER_TAMIYO_HEURISTIC"] = json.dumps(dict(defaults["heuristic"]))
    if defaults.get("blueprints"):
        env["ESPER_TEZZERET_CATALOG_BLUEPRINTS"] = json.dumps(list(defaults["blueprints"]))
    return env


def _submit_and_report(run_cfg: Any, platform: EmbeddedPlatform, console: Any, out: Path,
                       t0: float) -> Path:
    from esper.tolaria.client import TolariaClient
    from esper.tolaria.commands import follow_run
    from esper.tolaria.report import write_report
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    for part, target in sorted(platform.endpoints.items()):
        console.print(f"  {part:<9} {target}")
    console.print(f"  nats      {platform.nats_url}")
    job, params = run_cfg.job_spec()
    with TolariaClient(platform.endpoints["tolaria"], platform.api_key) as tolaria:
        run = tolaria.start_run(run_cfg, request_id=str(uuid.uuid4()))
        console.print(f"run [bold]{run.run_id}[/]: job {job} {params}, {run_cfg.epochs} epochs, "
                      f"heuristic controller over gRPC, up to {run_cfg.budget.max_seeds} seeds; "
                      "kernels for its sites are compiled on demand")
        events = follow_run(tolaria.watch(run.run_id), run_cfg.epochs, console)
        final = tolaria.get_run(run.run_id)
    report = write_report(events, out / "report", title=f"Esper demo: {job} / {params['host']} "
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
    parser = argparse.ArgumentParser(prog="python -m esper.experiments.demo")
    register_cli(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["demo", *sys.argv[1:]])
    sys.exit(ns.func(ns))
