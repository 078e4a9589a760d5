"""The experiments' subcommands: `esper demo`, `esper bench growth|controllers|growth-mlp` and
`esper tamiyo train` (each runs the training stack in this process or starts a platform,
so they live on the top floor).

Heavy imports (torch, the platform) stay inside the commands: every `esper` invocation
imports this module.
"""

from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from esper.experiments import demo, tamiyo_train

    demo.register_cli(sub)
    tamiyo_train.register(sub)
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
    mlp = kinds.add_parser(
        "growth-mlp", add_help=False, prefix_chars="\0",
        help="width growth on MNIST-1D's 40→16→16→10 MLP against GroMo's result "
             "(`esper bench growth-mlp --help` for its options)")
    mlp.add_argument("argv", nargs="*")
    mlp.set_defaults(func=_bench_growth_mlp)


def _bench_growth(args: argparse.Namespace) -> int:
    from esper.experiments import growth

    return int(growth.main(args.argv) or 0)


def _bench_controllers(args: argparse.Namespace) -> int:
    from esper.experiments import controllers

    return int(controllers.main(args.argv) or 0)


def _bench_growth_mlp(args: argparse.Namespace) -> int:
    from esper.experiments import growth_mlp

    return int(growth_mlp.main(args.argv) or 0)
