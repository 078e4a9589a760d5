"""Tolaria's subcommands: `esper demo` (the README's first command), `esper run ...` and
`esper jobs list` (a running platform, esper/tolaria/commands.py), `esper bench growth` and
`esper bench controllers`.

Heavy imports (torch, the platform) stay inside the commands: every `esper` invocation
imports this module.
"""

from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from esper import demo
    from esper.tolaria import commands

    demo.register_cli(sub)
    commands.register(sub)
    bench = sub.add_parser("bench", help="reproducible benchmarks")
    kinds = bench.add_subparsers(dest="bench", metavar="<benchmark>")
    kinds.required = True
    growth = kinds.add_parser(
        "growth", add_help=False, prefix_chars="\0",
        help="compute-matched growth proof: static-initial, static-final, fixed, random, heuristic "
             "(`esper bench growth --help` for its options)")
    # Its own parser owns the options (and --help); everything after "growth" goes to it.
    growth.add_argument("argv", nargs="*")
    growth.set_defaults(func=_bench_growth)
    controllers = kinds.add_parser(
        "controllers", add_help=False, prefix_chars="\0",
        help="learned vs heuristic vs random vs fixed on held-out tasks and seeds "
             "(`esper bench controllers --help` for its options)")
    controllers.add_argument("argv", nargs="*")
    controllers.set_defaults(func=_bench_controllers)


def _bench_growth(args: argparse.Namespace) -> int:
    from esper.tolaria import bench_growth

    return int(bench_growth.main(args.argv) or 0)


def _bench_controllers(args: argparse.Namespace) -> int:
    from esper import bench_controllers

    return int(bench_controllers.main(args.argv) or 0)
