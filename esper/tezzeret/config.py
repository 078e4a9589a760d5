"""Tezzeret's settings (`ctx.settings["tezzeret"]`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esper.config import from_dict


@dataclass(kw_only=True, frozen=True)
class TezzeretConfig:
    """How Tezzeret signs, benchmarks and which catalog it compiles."""

    signing_key_file: str = ""
    """PEM file of the Ed25519 signing key; empty: ESPER_SIGNING_KEY / ESPER_SIGNING_KEY_FILE,
    else a key created on first start at `<data_dir>/tezzeret/signing_key.pem`."""
    trusted_keys_dir: str = ""
    """Where Tezzeret publishes its public key (`tezzeret-<key id>.pub`) for Urza and the
    loaders to trust; empty: ESPER_TRUSTED_KEYS_DIR, else `<data_dir>/trusted_keys`."""
    benchmark_iters: int = 20
    """Timed forward passes per compile (0: no latency benchmark)."""
    benchmark_batch_size: int = 8
    """Batch size of the latency benchmark."""
    urza_timeout_s: float = 10.0
    """Deadline of each call to Urza (retries fit inside it)."""
    catalog_sites: tuple[dict[str, Any], ...] = ()
    """Sites ({layout, channels, spatial}) to compile the built-in catalog for at start."""
    catalog_blueprints: tuple[str, ...] = ()
    """Names of the built-in blueprints Tezzeret compiles for `catalog_sites` and for the
    sites `EnsureKernels` asks about; empty: all of them."""
    max_parallel_compiles: int = 2
    """Compiles running at once (each one is CPU-bound torch work in the service)."""

    def __post_init__(self) -> None:
        if not 0 <= self.benchmark_iters <= 10_000:
            raise ValueError(f"benchmark_iters={self.benchmark_iters}: must be in [0, 10000]")
        if not 1 <= self.benchmark_batch_size <= 4096:
            raise ValueError(f"benchmark_batch_size={self.benchmark_batch_size}: must be in "
                             "[1, 4096]")
        if not 1 <= self.max_parallel_compiles <= 64:
            raise ValueError(f"max_parallel_compiles={self.max_parallel_compiles}: must be in "
                             "[1, 64]")
        if not self.urza_timeout_s > 0:
            raise ValueError(f"urza_timeout_s={self.urza_timeout_s}: must be > 0")
        from esper.blueprints import builtin_blueprints

        names = {bp.name for bp in builtin_blueprints()}
        unknown_bps = sorted(set(self.catalog_blueprints) - names)
        if unknown_bps:
            raise ValueError(f"catalog_blueprints {unknown_bps}: not built-in blueprints; "
                             f"known: {sorted(names)}")
        for s in self.catalog_sites:
            if not isinstance(s, dict) or not {"layout", "channels"} <= set(s) or \
                    not set(s) <= {"layout", "channels", "spatial"}:
                raise ValueError(f"catalog_sites entry {s!r}: needs layout and channels, "
                                 "optional spatial, nothing else")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TezzeretConfig:
        return from_dict(cls, data, what="tezzeret settings")
