"""Run Urza alone in this process (for tests, benchmarks and single-part deployments).

    python -m esper.urza.serve_standalone --data-dir /var/lib/esper --port 50051 \
        [--trusted-keys-dir DIR] [--database-url postgresql://...] [--ready-file F]

API keys come from ESPER_API_KEYS / ESPER_API_KEYS_FILE unless --insecure-no-auth. Any other
Urza setting comes from ESPER_URZA_<KEY> (as for `esper serve`); the flags win. SIGHUP
re-reads the trusted keys.
Once SERVING, the bound port is printed as `URZA_READY <port>` and, with --ready-file,
written to that file (atomically), so a parent using port 0 can find it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from esper.fsutil import atomic_write
from esper.runtime.auth import AuthConfig
from esper.runtime.config import PlatformConfig
from esper.runtime.host import serve
from esper.runtime.spec import PlatformContext
from esper.urza.service import create_service


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m esper.urza.serve_standalone",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--trusted-keys-dir", default="")
    ap.add_argument("--database-url", default="")
    ap.add_argument("--ready-file", type=Path)
    ap.add_argument("--insecure-no-auth", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = dict(PlatformConfig.load(None, env={
        k: v for k, v in os.environ.items() if k.startswith("ESPER_URZA_")}).settings.get(
            "urza", {}))
    settings.update({k: v for k, v in (("trusted_keys_dir", args.trusted_keys_dir),
                                       ("database_url", args.database_url)) if v})
    ctx = PlatformContext(data_dir=args.data_dir, settings={"urza": settings})
    auth = AuthConfig(disabled=True) if args.insecure_no_auth else AuthConfig.from_env()

    def ready(port: int) -> None:
        print(f"URZA_READY {port}", flush=True)
        if args.ready_file is not None:
            atomic_write(args.ready_file, str(port), durable=False)

    async def run() -> None:
        await serve([create_service(ctx)], host=args.host, port=args.port, auth=auth,
                    ready=ready, grace_s=1.0, notice_s=0.0)

    asyncio.run(run())


if __name__ == "__main__":
    main()
