"""Kernel loader: fetch → verify → cache → materialise, never executing artifact content.

A pure library: the caller supplies `fetch(kernel_id, timeout_s) -> bytes` (for example
the Urza client, which owns deadlines, retries and the circuit breaker). Verified kernels
are kept in an in-memory LRU and on disk, keyed by the kernel id (SHA-256 of the manifest);
disk entries are verified again every time they are read, so a corrupted or swapped file
is dropped and fetched afresh instead of attached.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from esper.blueprints.artifact import TrustedKeys, VerifiedKernel, materialize, verify_artifact
from esper.errors import ArtifactError, DeadlineExceededError, InvalidArgumentError
from esper.fsutil import atomic_write

log = logging.getLogger(__name__)

KERNEL_ID = re.compile(r"^sha256:[0-9a-f]{64}$")

Fetch = Callable[[str, float], bytes]


@dataclass
class LoaderStats:
    """Counters of where kernels came from and what was refused."""

    memory_hits: int = 0
    disk_hits: int = 0
    fetches: int = 0
    rejected: int = 0
    """Artifacts (fetched or on disk) that failed verification."""
    disk_evictions: int = 0
    """Disk entries removed because they no longer verified."""


class KernelLoader:
    """Loads verified kernels as fresh modules."""

    def __init__(self, fetch: Fetch, trusted_keys: TrustedKeys, cache_dir: str | Path, *,
                 memory_items: int = 64):
        if memory_items < 1:
            raise InvalidArgumentError(f"memory_items={memory_items} must be >= 1",
                                       field="memory_items")
        self._fetch = fetch
        self._trusted = trusted_keys
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, VerifiedKernel] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.Lock()
        # One lock per kernel id so concurrent loads of the same kernel fetch it once.
        self._inflight: dict[str, threading.Lock] = {}
        self.stats = LoaderStats()

    def load(self, kernel_id: str, timeout_s: float) -> nn.Module:
        """A fresh module for `kernel_id`, with the artifact's weights.

        Raises:
            InvalidArgumentError: `kernel_id` is not "sha256:<64 hex>".
            ArtifactError / UntrustedKeyError: the artifact fails verification.
            UnavailableError / DeadlineExceededError: from `fetch`, or the deadline passed.
        """
        return materialize(self.verified(kernel_id, timeout_s))

    def prefetch(self, kernel_id: str, timeout_s: float) -> None:
        """Bring a kernel into the caches (verified) without building a module."""
        self.verified(kernel_id, timeout_s)

    def verified(self, kernel_id: str, timeout_s: float) -> VerifiedKernel:
        if not isinstance(kernel_id, str) or not KERNEL_ID.match(kernel_id):
            raise InvalidArgumentError(f"kernel_id {kernel_id!r} must be 'sha256:' followed by "
                                       "64 lower-case hex digits", field="kernel_id")
        deadline = time.monotonic() + timeout_s
        vk = self._from_memory(kernel_id)
        if vk is not None:
            return vk
        with self._lock:
            gate = self._inflight.setdefault(kernel_id, threading.Lock())
        if not gate.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceededError(f"kernel {kernel_id}: another load of it did not finish "
                                        f"within {timeout_s:.3f}s")
        try:
            vk = self._from_memory(kernel_id)  # a concurrent load may have finished it
            if vk is None:
                vk = self._from_disk(kernel_id)
            if vk is None:
                vk = self._from_fetch(kernel_id, deadline)
            self._remember(vk)
            return vk
        finally:
            gate.release()

    def evict_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    def path_for(self, kernel_id: str) -> Path:
        return self.cache_dir / f"{kernel_id.removeprefix('sha256:')}.kernel"

    # ------------------------------------------------------------------ internals

    def _from_memory(self, kernel_id: str) -> VerifiedKernel | None:
        with self._lock:
            vk = self._memory.get(kernel_id)
            if vk is not None:
                self._memory.move_to_end(kernel_id)
                self.stats.memory_hits += 1
            return vk

    def _remember(self, vk: VerifiedKernel) -> None:
        with self._lock:
            self._memory[vk.kernel_id] = vk
            self._memory.move_to_end(vk.kernel_id)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def _from_disk(self, kernel_id: str) -> VerifiedKernel | None:
        path = self.path_for(kernel_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            vk = verify_artifact(data, self._trusted, expected_kernel_id=kernel_id)
        except ArtifactError as e:
            # Corrupted on disk, or the trust set changed: never attach it; fetch afresh.
            log.warning("dropping cached kernel %s at %s: %s", kernel_id, path, e)
            self.stats.rejected += 1
            self.stats.disk_evictions += 1
            path.unlink(missing_ok=True)
            return None
        self.stats.disk_hits += 1
        return vk

    def _from_fetch(self, kernel_id: str, deadline: float) -> VerifiedKernel:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"kernel {kernel_id}: deadline passed before fetching")
        data = self._fetch(kernel_id, remaining)
        self.stats.fetches += 1
        try:
            vk = verify_artifact(data, self._trusted, expected_kernel_id=kernel_id)
        except ArtifactError:
            self.stats.rejected += 1
            raise
        atomic_write(self.path_for(kernel_id), data)
        return vk
