"""`esper karn evolve`: drive KarnService.ProposeBlueprints for N generations.

Against a running platform (`esper up`), endpoints and the API key come from
`<data-dir>/endpoints.json` (as `esper status` reads them) or ESPER_ENDPOINTS /
ESPER_API_KEY. With `--embedded`, Urza, Tezzeret and Karn are hosted in this process on
loopback over `<data-dir>` (the built-in catalog is compiled for the site first).

Each generation is one ProposeBlueprints call; the children Urza accepted become parents
in the next one. Selection reads Urza's field reports: run growth (or the benchmark
`benchmarks/karn_blueprints.py`) between generations for the front to move.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path
from typing import Any

from esper.errors import ConfigError, UnavailableError


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


def _platform(data_dir: Path) -> tuple[str, str | None]:
    """(karn target, api key) of a running platform."""
    from esper.runtime.auth import parse_keys
    from esper.runtime.cli import ENDPOINTS_FILE, ENV_API_KEY, ENV_ENDPOINTS, parse_endpoints

    key = os.environ.get(ENV_API_KEY)
    path = data_dir / ENDPOINTS_FILE
    if path.exists():
        info = json.loads(path.read_text())
        target = info["endpoints"].get("karn")
        if key is None and info.get("api_keys_file"):
            keys_path = Path(info["api_keys_file"])
            keys = parse_keys(keys_path.read_text(), source=str(keys_path), separator="\n")
            key = next((k for k, scopes in keys.items() if "*" in scopes), None)
    elif os.environ.get(ENV_ENDPOINTS):
        target = parse_endpoints(os.environ[ENV_ENDPOINTS]).get("karn")
    else:
        raise UnavailableError(f"no {path} (is `esper up --data-dir {data_dir}` running?) and "
                               f"no {ENV_ENDPOINTS}; or pass --embedded")
    if not target:
        raise UnavailableError(f"the platform at {data_dir} has no karn endpoint")
    return target, key


def _print_generation(gen: int, resp: Any) -> None:
    for p in resp.proposals:
        status = "accepted" if p.accepted else "rejected"
        parents = ",".join(p.blueprint.parent_ids)
        extra = p.kernel_id[:23] if p.accepted else p.rejection[:100]
        print(f"{gen:>3}  {status:<8}  {p.operator:<26}  {p.blueprint.name:<44}  "
              f"parents={parents}  {extra}")


async def _evolve(args: argparse.Namespace, target: str, key: str | None) -> int:
    import grpc

    from esper.karn.evolve import derive_seed
    from esper.runtime.client import as_esper_error, channel
    from generated.esper.karn.v1 import karn_service_pb2 as pb
    from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc

    site = parse_site(args.site)
    accepted = 0
    async with channel(target, api_key=key, default_timeout_s=args.timeout) as ch:
        stub = rpc.KarnServiceStub(ch)
        for gen in range(1, args.generations + 1):
            req = pb.ProposeBlueprintsRequest(
                request_id=str(uuid.uuid4()), count=args.per_generation, site=site,
                seed=derive_seed(args.seed, gen) if args.seed else 0)
            try:
                resp = await stub.ProposeBlueprints(req, timeout=args.timeout)
            except grpc.RpcError as e:
                raise as_esper_error(e) from e
            _print_generation(gen, resp)
            accepted += sum(p.accepted for p in resp.proposals)
    print(f"{accepted} blueprints accepted over {args.generations} generation(s)")
    return 0 if accepted else 1


async def _embedded(args: argparse.Namespace) -> int:
    import asyncio
    import secrets

    from esper.blueprints import builtin_blueprints, supports
    from esper.karn.service import create_service as karn_service
    from esper.runtime.auth import AuthConfig
    from esper.runtime.host import Host, HostConfig
    from esper.runtime.spec import PlatformContext
    from esper.tezzeret.service import create_service as tezzeret_service
    from esper.urza.client import UrzaClient
    from esper.urza.service import create_service as urza_service

    site = parse_site(args.site)
    data_dir = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = data_dir / "trusted_keys"
    keys_dir.mkdir(exist_ok=True)
    key = secrets.token_urlsafe(24)
    auth = AuthConfig(keys={key: frozenset({"*"})})
    spatial = list(site.spatial)
    ctx = PlatformContext(data_dir=data_dir, api_key=key, settings={
        "urza": {"trusted_keys_dir": str(keys_dir)},
        "tezzeret": {"trusted_keys_dir": str(keys_dir), "benchmark_iters": 0,
                     "catalog_sites": [{"layout": args.site.split(":")[0],
                                        "channels": site.channels, "spatial": spatial}]},
    })
    hosts: list[Host] = []
    try:
        for make, part in ((urza_service, "urza"), (tezzeret_service, "tezzeret"),
                           (karn_service, "karn")):
            h = Host([make(ctx)], config=HostConfig(port=0), auth=auth)
            hosts.append(h)
            ctx.endpoints[part] = f"127.0.0.1:{await h.start()}"
        expected = sum(1 for b in builtin_blueprints() if supports(b, site))
        with UrzaClient(ctx.endpoints["urza"], api_key=key) as urza:
            for _ in range(int(args.timeout * 4)):
                records, _ = await asyncio.to_thread(urza.query_kernels, 10.0, site=site)
                if len(records) >= expected:
                    break
                await asyncio.sleep(0.25)
        return await _evolve(args, ctx.endpoints["karn"], key)
    finally:
        for h in reversed(hosts):
            await h.stop("esper karn evolve done")


def run_evolve(args: argparse.Namespace) -> int:
    import asyncio

    if args.generations < 1 or not 1 <= args.per_generation <= 64:
        raise ConfigError(f"--generations={args.generations} must be >= 1 and "
                          f"--per-generation={args.per_generation} in [1, 64]")
    if args.embedded:
        return asyncio.run(_embedded(args))
    target, key = _platform(args.data_dir)
    return asyncio.run(_evolve(args, target, key))


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
                   help="host Urza, Tezzeret and Karn in this process instead of connecting")
    e.add_argument("--timeout", type=float, default=300.0, help="seconds per generation")
    e.set_defaults(func=run_evolve)
