"""Urza hosted by the runtime host on a loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.urza.service import create_service

API_KEY = "urza-test-key"


@contextmanager
def hosted(spec: ServiceSpec, keys: dict[str, frozenset[str]] | None = None) -> Iterator[str]:
    """Serve `spec` until the block ends; yields "127.0.0.1:<port>"."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        host = Host([spec], config=HostConfig(port=0, grace_s=0.5, notice_s=0.0),
                    auth=AuthConfig(keys=keys or {API_KEY: frozenset({"*"})}))
        box["host"] = host
        try:
            box["port"] = await host.start()
        finally:
            started.set()
        await host.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    started.wait(30)
    if "port" not in box:
        thread.join(5)
        raise RuntimeError("Urza host did not start")
    try:
        yield f"127.0.0.1:{box['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(box["host"].stop("test done"), loop).result(30)
        thread.join(30)
        loop.close()


@contextmanager
def urza(data_dir: Path, keys_dir: Path, *, keys: dict[str, frozenset[str]] | None = None,
         **settings: Any) -> Iterator[str]:
    ctx = PlatformContext(data_dir=data_dir,
                          settings={"urza": {"trusted_keys_dir": str(keys_dir), **settings}})
    with hosted(create_service(ctx), keys) as target:
        yield target
