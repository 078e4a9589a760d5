"""KernelLoader: caches, freshness of modules, concurrency, errors."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.errors import InvalidArgumentError, UnavailableError, UntrustedKeyError
from esper.kasmina.loader import KernelLoader

sys.path.insert(0, str(Path(__file__).parent))
import malicious

KEY = SigningKey.from_bytes(b"33" * 32)


@pytest.fixture(scope="module")
def kernel():
    return malicious.genuine(KEY)


class Library:
    """An in-process artifact source that counts calls."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, kernel_id: str, timeout_s: float) -> bytes:
        assert timeout_s > 0
        with self.lock:
            self.calls.append(kernel_id)
        return self.blobs[kernel_id]


def test_load_roundtrip_and_fresh_modules(kernel, tmp_path):
    kid, data = kernel
    lib = Library({kid: data})
    loader = KernelLoader(lib, TrustedKeys([KEY]), tmp_path)
    a = loader.load(kid, 5.0)
    b = loader.load(kid, 5.0)
    assert lib.calls == [kid]
    assert loader.stats.memory_hits == 1 and loader.stats.fetches == 1
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(a(x), torch.zeros_like(x))
    with torch.no_grad():
        a.nodes.conv2.weight.add_(1.0)
    assert not torch.equal(a.nodes.conv2.weight, b.nodes.conv2.weight)
    assert all(p.requires_grad for p in b.parameters())
    assert loader.path_for(kid).read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [loader.path_for(kid).name]


def test_disk_cache_survives_a_new_loader(kernel, tmp_path):
    kid, data = kernel
    lib = Library({kid: data})
    KernelLoader(lib, TrustedKeys([KEY]), tmp_path).load(kid, 5.0)
    second = KernelLoader(lib, TrustedKeys([KEY]), tmp_path)
    second.load(kid, 5.0)
    assert lib.calls == [kid]
    assert second.stats.disk_hits == 1


def test_cached_kernel_of_a_no_longer_trusted_key_is_dropped_not_attached(kernel, tmp_path):
    kid, data = kernel
    lib = Library({kid: data})
    KernelLoader(lib, TrustedKeys([KEY]), tmp_path).load(kid, 5.0)
    other = SigningKey.from_bytes(b"44" * 32)
    revoked = KernelLoader(lib, TrustedKeys([other]), tmp_path)
    with pytest.raises(UntrustedKeyError, match=KEY.key_id):
        revoked.load(kid, 5.0)
    # The disk entry was verified again, refused, removed, and the fresh fetch refused too.
    assert revoked.stats.disk_hits == 0 and revoked.stats.disk_evictions == 1
    assert revoked.stats.fetches == 1 and revoked.stats.rejected == 2
    assert not revoked.path_for(kid).exists()


def test_lru_evicts_oldest(tmp_path):
    k1 = malicious.genuine(KEY)
    k2 = malicious.resign(k1[1], KEY)  # Ed25519 is deterministic: same manifest, same id
    assert k2[0] == k1[0]
    other = SigningKey.from_bytes(b"44" * 32)
    k3 = malicious.resign(k1[1], other)
    lib = Library({k1[0]: k1[1], k3[0]: k3[1]})
    loader = KernelLoader(lib, TrustedKeys([KEY, other]), tmp_path, memory_items=1)
    loader.load(k1[0], 5.0)
    loader.load(k3[0], 5.0)
    loader.load(k1[0], 5.0)
    assert loader.stats.memory_hits == 0 and loader.stats.disk_hits == 1
    assert lib.calls == [k1[0], k3[0]]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "sha256:XYZ", "sha256:" + "A" * 64, ""])
def test_bad_kernel_id(bad, tmp_path):
    loader = KernelLoader(Library({}), TrustedKeys([KEY]), tmp_path)
    with pytest.raises(InvalidArgumentError, match="64 lower-case hex"):
        loader.load(bad, 1.0)


def test_fetch_failure_propagates_and_caches_nothing(tmp_path):
    def down(kernel_id, timeout_s):
        raise UnavailableError("urza circuit open")

    loader = KernelLoader(down, TrustedKeys([KEY]), tmp_path)
    with pytest.raises(UnavailableError, match="circuit open"):
        loader.load("sha256:" + "0" * 64, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_loads_fetch_once(kernel, tmp_path):
    kid, data = kernel
    lib = Library({kid: data})
    loader = KernelLoader(lib, TrustedKeys([KEY]), tmp_path)
    results: list[torch.nn.Module] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(loader.load(kid, 10.0))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 8 and len({id(m) for m in results}) == 8
    assert lib.calls == [kid]


def test_memory_items_validated(tmp_path):
    with pytest.raises(InvalidArgumentError, match="memory_items=0"):
        KernelLoader(Library({}), TrustedKeys(), tmp_path, memory_items=0)
