"""`esper karn evolve`: drive KarnService.ProposeBlueprints for N generations.

A client of the platform, like any other: Karn's endpoint and the API key come from
ESPER_ENDPOINTS / ESPER_API_KEY, else from a local `esper up`'s `<data-dir>/endpoints.json`
(`esper.runtime.endpoints.find_part`). With `--embedded` there need be no platform: the
command starts one for itself (`esper up --data-dir <data-dir>` as a child process,
`esper.runtime.embedded`), has Tezzeret compile the built-in catalog for the site
(`EnsureKernels`, no latency benchmark) and stops the platform when it is done; Urza's
store stays in `<data-dir>`.

Each generation is one ProposeBlueprints call; the children Urza accepted become parents
in the next one. Selection reads Urza's field reports: run growth (or the benchmark
`benchmarks/karn_blueprints.py`) between generations for the front to move.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from esper.errors import ConfigError


def parse_site(text: str) -> Any:
    """"NCL:8:40" / "NCHW:16:8x8" / "NC:32" → SiteSignature.

    Raises:
        ConfigError: not LAYOUT:CHANNELS[:SPATIAL] with a known layout.
    """
    from esper.blueprints import site_signature
    from esper.errors import BlueprintError

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected LAYOUT:CHANNELS[:SPATIAL]")
        spatial = [int(s) for s in parts[2].split("x")] if len(parts) == 3 and parts[2] else []
        return site_signature(parts[0], int(parts[1]), spatial)
    except (ValueError, BlueprintError) as e:
        raise ConfigError(f"--site {text!r}: {e}; e.g. NCL:8:40, NCHW:16:8x8, NC:32") from e


def _print_generation(gen: int, resp: Any) -> None:
    for p in resp.proposals:
        status = "accepted" if p.accepted else "rejected"
        parents = ",".join(p.blueprint.parent_ids)
        extra = p.kernel_id[:23] if p.accepted else p.rejection[:100]
        print(f"{gen:>3}  {status:<8}  {p.operator:<26}  {p.blueprint.name:<44}  "
              f"parents={parents}  {extra}")


def _evolve(args: argparse.Namespace, target: str, key: str | None) -> int:
    from esper.karn.client import KarnClient
    from esper.karn.evolve import derive_seed

    site = parse_site(args.site)
    accepted = 0
    with KarnClient(target, key) as karn:
        for gen in range(1, args.generations + 1):
            resp = karn.propose_blueprints(
                site, args.per_generation, args.timeout, request_id=str(uuid.uuid4()),
                seed=derive_seed(args.seed, gen) if args.seed else 0)
            _print_generation(gen, resp)
            accepted += sum(p.accepted for p in resp.proposals)
    print(f"{accepted} blueprints accepted over {args.generations} generation(s)")
    return 0 if accepted else 1


def _embedded(args: argparse.Namespace) -> int:
    from esper.runtime.embedded import EmbeddedPlatform
    from esper.tezzeret.client import DONE, TezzeretClient

    site = parse_site(args.site)
    # No latency benchmark: compiling the catalog for the site is then deterministic (the
    # same kernel ids every time) and quick.
    platform = EmbeddedPlatform(args.data_dir, env={"ESPER_TEZZERET_BENCHMARK_ITERS": "0"})
    with platform.start(args.timeout):
        # Parents first: the built-in catalog compiled (once) for the site.
        with TezzeretClient(platform.endpoints["tezzeret"], platform.api_key) as tezzeret:
            jobs, _ = tezzeret.ensure_kernels(site, args.timeout, wait=True)
        pending = [j.job_id for j in jobs if j.state not in DONE]
        if pending:
            print(f"catalog for {args.site}: {len(pending)} compile job(s) still running; "
                  "evolving from the kernels that are ready")
        return _evolve(args, platform.endpoints["karn"], platform.api_key)


def run_evolve(args: argparse.Namespace) -> int:
    from esper.runtime.endpoints import find_part

    if args.generations < 1 or not 1 <= args.per_generation <= 64:
        raise ConfigError(f"--generations={args.generations} must be >= 1 and "
                          f"--per-generation={args.per_generation} in [1, 64]")
    if args.embedded:
        return _embedded(args)
    karn = find_part("karn", data_dir=args.data_dir)
    return _evolve(args, karn.target, karn.api_key)


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("karn", help="the generative architect")
    karn_sub = p.add_subparsers(dest="karn_command", metavar="<karn command>")
    karn_sub.required = True
    e = karn_sub.add_parser("evolve", help="propose new blueprints for N generations")
    e.add_argument("--generations", type=int, required=True, help="ProposeBlueprints calls")
    e.add_argument("--per-generation", type=int, default=4,
                   help="proposals per generation (1..64, default 4)")
    e.add_argument("--site", default="NCL:8:40",
                   help="site the children must compile for, LAYOUT:CHANNELS[:SPATIAL] "
                        "(default NCL:8:40, an MNIST-1D conv host)")
    e.add_argument("--seed", type=int, default=0, help="seed of the run (0: random)")
    e.add_argument("--data-dir", type=Path, default=Path(".esper"),
                   help="platform state (endpoints.json of `esper up`, or --embedded's store)")
    e.add_argument("--embedded", action="store_true",
                   help="start a platform for this command (`esper up` as a child process) "
                        "instead of connecting to a running one")
    e.add_argument("--timeout", type=float, default=300.0, help="seconds per generation")
    e.set_defaults(func=run_evolve)
