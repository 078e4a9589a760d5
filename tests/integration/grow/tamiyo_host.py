"""A real TamiyoService (runtime Host: auth, protovalidate, error mapping) on loopback, on a
thread of its own, so a blocking training loop can call it as it would call `esper up`."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tamiyo.service import create_service

KEY = "grow-test-key-0123456789abcdef"


class TamiyoThread:
    def __init__(self, data_dir: Path, settings: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        # No Urza endpoint: the grower's candidates are the only kernels Tamiyo can see.
        ctx = PlatformContext(data_dir=data_dir, api_key=KEY, settings={"tamiyo": settings or {}})

        async def start() -> int:
            self.host = Host([create_service(ctx)], config=HostConfig(grace_s=0.5, notice_s=0.0),
                             auth=AuthConfig(keys={KEY: frozenset({"*"})}))
            return await self.host.start()

        port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.host.stop("test over"), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
