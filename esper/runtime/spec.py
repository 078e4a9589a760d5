"""What a service hands the shared host, and what the host hands a service.

Every part's `esper/<part>/service.py` exposes

    def create_service(ctx: PlatformContext) -> ServiceSpec

and knows nothing else of how it is served: `esper serve <part>` hosts one spec,
`esper up` hosts them all in one process on loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTS: tuple[str, ...] = ("urza", "tezzeret", "tamiyo", "karn", "tolaria")
"""Every Esper gRPC service, in start order (a part may call those before it)."""


@dataclass(kw_only=True)
class ServiceSpec:
    """One gRPC service ready to be hosted."""

    part: str
    """Short name: "urza", "tezzeret", "tamiyo", "karn", "tolaria"."""
    service_name: str
    """Full proto name, e.g. "esper.urza.v1.UrzaService" (health, reflection, scopes)."""
    servicer: Any
    """Instance of the generated `<Service>Servicer` subclass."""
    add_to_server: Callable[[Any, Any], None]
    """The generated `add_<Service>Servicer_to_server`."""
    write_methods: frozenset[str] = frozenset()
    """Method names that need the "<part>:write" scope; every other needs "<part>:read"."""
    on_start: Callable[[], Awaitable[None]] | None = None
    """Awaited after the server is listening, before health turns SERVING."""
    on_stop: Callable[[], Awaitable[None]] | None = None
    """Awaited after in-flight calls drained, before the process exits."""


@dataclass(kw_only=True)
class PlatformContext:
    """What every service may know about the platform it runs in."""

    data_dir: Path
    """Root of this platform's state; each part uses `data_dir / <part>`."""
    endpoints: dict[str, str] = field(default_factory=dict)
    """part → "host:port" of every service (for clients to other parts)."""
    api_key: str | None = None
    """Key this process sends on outbound calls (None: auth disabled)."""
    nats_url: str | None = None
    """NATS server for Oona (None: no bus; events are only logged)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Part-specific settings, e.g. settings["urza"]["database_url"]."""

    def part_dir(self, part: str) -> Path:
        d = self.data_dir / part
        d.mkdir(parents=True, exist_ok=True)
        return d
