"""`esper run submit|watch|get|list|stop` and `esper jobs list`: a running platform, from a shell.

Where the platform is: `--endpoint host:port` and `--api-key` (or `--api-key-file`), else
ESPER_ENDPOINTS (`tolaria=host:port,...`) and ESPER_API_KEY, else the `endpoints.json` and
API-key file of a local `esper up` in `--data-dir` (default ESPER_DATA_DIR, else .esper).

Exit codes (for scripts): 0 done (a watched run SUCCEEDED); 1 the watched run FAILED;
2 refused or unreachable (bad argument, unknown run, no platform; the message says which);
3 the watched run was STOPPED; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_STOPPED = 0, 1, 2, 3
EXIT_HELP = """\
exit codes: 0 done (a watched run succeeded), 1 the watched run failed, 2 refused or
unreachable (the message says why), 3 the watched run was stopped, 130 interrupted.
where the platform is: --endpoint/--api-key, else ESPER_ENDPOINTS (tolaria=host:port)
and ESPER_API_KEY, else <data-dir>/endpoints.json of a local `esper up`."""
DEFAULT_JOB = "mnist1d"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fmt = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser("run", help="submit, follow, inspect and stop runs on a running platform",
                         epilog=EXIT_HELP, formatter_class=fmt)
    cmds = run.add_subparsers(dest="run_command", metavar="<command>")
    cmds.required = True

    p = cmds.add_parser("submit", help="start a run of a registered job (prints its id)",
                        epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("--job", default=None,
                   help=f"registered job (`esper jobs list`; default {DEFAULT_JOB})")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a job parameter (repeatable)")
    p.add_argument("--config", type=Path,
                   help="a RunConfig as YAML or JSON (RunConfig.from_dict keys); flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--controller", help="heuristic, gnn, random, fixed or none")
    p.add_argument("--max-seeds", type=int, help="seeds the controller may germinate")
    p.add_argument("--sites", help="comma-separated module-name patterns (default: the job's)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--request-id", help="idempotency key (a UUID): resubmitting it returns the same run")
    p.add_argument("--watch", action="store_true",
                   help="follow the run until it ends; the exit code says how it ended")
    p.add_argument("--json", action="store_true", help="print the Run as JSON")
    p.set_defaults(func=cmd_submit)

    p = cmds.add_parser("watch", help="follow a run with a progress bar until it ends",
                        epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("run_id")
    p.add_argument("--from-sequence", type=int, default=0, help="replay events from this one on")
    p.add_argument("--quiet", action="store_true", help="no progress bar or event lines")
    p.set_defaults(func=cmd_watch)

    p = cmds.add_parser("get", help="one run's state", epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_get)

    p = cmds.add_parser("list", help="runs, oldest first", epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("--state", choices=["pending", "running", "succeeded", "failed", "stopped"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("stop", help="stop a run at its next step boundary (it checkpoints)",
                        epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("run_id")
    p.add_argument("--reason", default="stopped from the command line")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.set_defaults(func=cmd_stop)

    jobs = sub.add_parser("jobs", help="the jobs a running platform can train")
    jcmds = jobs.add_subparsers(dest="jobs_command", metavar="<command>")
    jcmds.required = True
    p = jcmds.add_parser("list", help="registered jobs and their parameters",
                         epilog=EXIT_HELP, formatter_class=fmt)
    _where(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)


def _where(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("platform")
    g.add_argument("--endpoint", help="Tolaria's host:port")
    g.add_argument("--api-key", help="API key to send (prefer ESPER_API_KEY or --api-key-file: "
                                     "a flag is visible to other users in the process list)")
    g.add_argument("--api-key-file", type=Path, help="file holding the API key (one line)")
    g.add_argument("--data-dir", type=Path, help="data dir of a local `esper up` (default "
                                                 "ESPER_DATA_DIR, else .esper)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")


def _client(args: argparse.Namespace) -> Any:
    from esper.tolaria.client import TolariaClient, find_platform

    key = args.api_key
    if args.api_key_file is not None:
        key = args.api_key_file.read_text().strip()
    p = find_platform(endpoint=args.endpoint, api_key=key, data_dir=args.data_dir)
    return TolariaClient(p.target, p.api_key, timeout_s=args.timeout)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from esper.errors import InvalidArgumentError

    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise InvalidArgumentError(f"{what} {item!r} must be NAME=VALUE", field=what)
        out[k] = v
    return out


def run_config_from_args(args: argparse.Namespace) -> Any:
    """The RunConfig `esper run submit` sends: --config, then the flags on top."""
    from esper.tolaria.config import RunConfig

    data: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        from esper.errors import ConfigError

        try:
            loaded = yaml.safe_load(args.config.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {args.config}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of RunConfig keys")
        data.update(loaded)
    if args.job is not None or not (data.get("job") or data.get("task")):
        data["job"] = args.job or DEFAULT_JOB
    params = {**dict(data.get("job_params") or {}), **_pairs(args.param, "--param")}
    if params:
        data["job_params"] = params
    for flag, key in (("epochs", "epochs"), ("seed", "seed"), ("batch_size", "batch_size"),
                      ("controller", "controller")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.lr is not None:
        data["optimizer"] = {**dict(data.get("optimizer") or {}), "learning_rate": args.lr}
    if args.max_seeds is not None:
        data["budget"] = {**dict(data.get("budget") or {}), "max_seeds": args.max_seeds}
    if args.sites:
        data["sites"] = [s for s in args.sites.split(",") if s]
    labels = {**dict(data.get("labels") or {}), "launched_by": "esper run submit",
              **_pairs(args.label, "--label")}
    data["labels"] = labels
    return RunConfig.from_dict(data)


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = run_config_from_args(args)
    with _client(args) as tolaria:
        run = tolaria.start_run(cfg, request_id=args.request_id)
        if args.json:
            print(_json(run))
        elif args.watch:
            print(f"run {run.run_id}: job {cfg.job_name} {dict(cfg.job_spec()[1])}, "
                  f"{cfg.epochs} epochs, controller {cfg.controller}", file=sys.stderr)
        else:
            print(run.run_id)
        if not args.watch:
            return EXIT_OK
        return _follow(tolaria, run.run_id, 0, quiet=False)


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as tolaria:
        return _follow(tolaria, args.run_id, args.from_sequence, quiet=args.quiet)


def _follow(tolaria: Any, run_id: str, from_sequence: int, *, quiet: bool) -> int:
    from rich.console import Console

    run = tolaria.get_run(run_id)
    console = Console(stderr=True, quiet=quiet)
    follow_run(tolaria.watch(run_id, from_sequence), run.config.epochs, console)
    final = tolaria.get_run(run_id)
    state = _state(final.state)
    print(f"run {run_id} {state}: {final.detail}", file=sys.stderr)
    return {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "stopped": EXIT_STOPPED}.get(state, EXIT_ERROR)


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as tolaria:
        run = tolaria.get_run(args.run_id)
    if args.json:
        print(_json(run))
        return EXIT_OK
    job = run.config.job or run.config.task
    params = dict(run.config.job_params) or {"host": run.config.host}
    rows = [("run", run.run_id), ("state", _state(run.state)), ("job", f"{job} {params}"),
            ("epoch", f"{run.epoch}/{run.config.epochs}"),
            ("val accuracy", f"{100 * run.val_accuracy:.2f}%"), ("val loss", f"{run.val_loss:.4f}"),
            ("parameters", f"{run.parameters:,}"), ("degraded", ", ".join(run.degraded) or "-"),
            ("detail", run.detail or "-")]
    for k, v in rows:
        print(f"{k:<13} {v}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    state = pb.RunState.Value(f"RUN_STATE_{args.state.upper()}") if args.state else 0
    with _client(args) as tolaria:
        runs = tolaria.list_runs(state=state, limit=args.limit)
    if args.json:
        print(json.dumps([json.loads(_json(r)) for r in runs], indent=2))
        return EXIT_OK
    print(f"{'run':<17} {'state':<10} {'job':<16} {'epoch':>9} {'val acc':>8} {'params':>9}")
    for r in runs:
        print(f"{r.run_id:<17} {_state(r.state):<10} {(r.config.job or r.config.task)[:16]:<16} "
              f"{f'{r.epoch}/{r.config.epochs}':>9} {100 * r.val_accuracy:>7.2f}% {r.parameters:>9,}")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as tolaria:
        run = tolaria.stop_run(args.run_id, args.reason)
        print(f"run {run.run_id}: stop requested ({_state(run.state)})", file=sys.stderr)
        if not args.wait:
            return EXIT_OK
        rc = _follow(tolaria, args.run_id, run.last_sequence + 1, quiet=True)
        return EXIT_OK if rc == EXIT_STOPPED else rc  # stopped is what was asked for


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as tolaria:
        jobs = tolaria.list_jobs()
    if args.json:
        print(json.dumps([json.loads(_json(j)) for j in jobs], indent=2))
        return EXIT_OK
    for j in jobs:
        print(f"{j.name}  ({j.source})  {j.description}")
        for p in j.parameters:
            if p.run_config_field:
                kind = f"from the run's {p.run_config_field}"
            elif p.required:
                kind = "required"
            else:
                kind = f"default {p.default_value!r}"
            choices = f" one of {', '.join(p.choices)};" if p.choices else ""
            print(f"    {p.name}: {p.type}{'|None' if p.accepts_none else ''} ({kind};{choices} "
                  f"{p.description})".replace("; )", ")"))
    return EXIT_OK


def _state(value: int) -> str:
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    return pb.RunState.Name(value).removeprefix("RUN_STATE_").lower()


def _json(msg: Any) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(msg, indent=2, preserving_proto_field_name=True)


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


def follow_run(events: Any, total_epochs: int, console: Any) -> list[Any]:
    """Show a run's event stream with a progress bar and a line per lifecycle event or
    degradation; returns every event."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from generated.esper.common.v1 import seed_pb2

    seen = []
    with Progress(TextColumn("[bold]epoch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=console) as progress:
        bar = progress.add_task("train", total=total_epochs, status="starting the worker")
        for env in events:
            seen.append(env)
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
                style = "green" if d.kind == "recovered" else "yellow"
                progress.console.print(f"  epoch {env.epoch:>3}  [{style}]{d.component}[/] {d.kind}: "
                                       f"{d.detail[:160]}")
            elif kind == "run_state":
                progress.update(bar, status=f"run {env.run_state.state}")
    return seen
