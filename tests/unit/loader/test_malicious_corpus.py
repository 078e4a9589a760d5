"""Every hostile artifact is refused with a typed error before any module is built,
nothing is written (not even to the cache) and no payload runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esper.blueprints import builder
from esper.blueprints.artifact import SigningKey, TrustedKeys, verify_artifact
from esper.errors import ArtifactError
from esper.kasmina.loader import KernelLoader

sys.path.insert(0, str(Path(__file__).parent))
import malicious

KEY = SigningKey.from_bytes(b"11" * 32)
OTHER = SigningKey.from_bytes(b"22" * 32)
NAMES = [
    "pickle_as_weights_signed", "pickle_as_weights_unsigned", "pickle_as_whole_artifact",
    "header_100mb", "entries_100k", "entries_5k_small_header", "truncated_weights",
    "truncated_artifact", "overlapping_offsets", "wrong_shape_vs_manifest", "wrong_shape_vs_ir",
    "wrong_dtype_vs_manifest", "dtype_not_allowed", "unknown_op", "cyclic_ir", "flip_weights",
    "flip_ir", "flip_manifest", "flip_signature", "untrusted_key",
]


@pytest.fixture(scope="module")
def canary_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("canary")


@pytest.fixture(scope="module")
def cases(canary_dir):
    return malicious.corpus(KEY, OTHER, str(canary_dir / "pwned"))


def test_corpus_is_complete(cases):
    assert sorted(cases) == sorted(NAMES)


def test_pickle_payload_is_live(tmp_path):
    """The corpus's pickle really runs code when unpickled (in a throwaway process)."""
    target = tmp_path / "proof"
    code = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); import malicious;"
            "blob = pickle.dumps(malicious.CanaryPayload(sys.argv[2])); pickle.loads(blob)")
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(target)],
                   check=True, cwd=os.getcwd())
    assert target.exists()


@pytest.fixture
def no_build(monkeypatch):
    built = []
    original = builder.BlueprintModule.__init__

    def counting(self, plan):
        built.append(plan)
        original(self, plan)

    monkeypatch.setattr(builder.BlueprintModule, "__init__", counting)
    return built


@pytest.mark.parametrize("name", NAMES)
def test_loader_rejects(name, cases, canary_dir, tmp_path, monkeypatch, no_build):
    case = cases[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    fetched = []

    def fetch(kernel_id: str, timeout_s: float) -> bytes:
        fetched.append(kernel_id)
        return case.data

    loader = KernelLoader(fetch, TrustedKeys([KEY]), cache)
    with pytest.raises(case.error) as info:
        loader.load(case.kernel_id, timeout_s=5.0)
    assert isinstance(info.value, ArtifactError)
    assert str(info.value)  # a message that says what failed
    assert fetched == [case.kernel_id]
    assert no_build == [], "a module was built from a rejected artifact"
    assert list(cache.iterdir()) == [], "a rejected artifact reached the cache"
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "work"]
    assert not (canary_dir / "pwned").exists()
    assert loader.stats.rejected == 1


@pytest.mark.parametrize("name", NAMES)
def test_verify_rejects_without_expected_id(name, cases, canary_dir):
    case = cases[name]
    if name == "flip_manifest":
        # Without an expected id the tampered manifest fails its signature instead.
        with pytest.raises(ArtifactError):
            verify_artifact(case.data, TrustedKeys([KEY]))
    else:
        with pytest.raises(case.error):
            verify_artifact(case.data, TrustedKeys([KEY]))
    assert not (canary_dir / "pwned").exists()


def test_corrupted_disk_entry_is_dropped_and_refetched(tmp_path, cases):
    kid, data = malicious.genuine(KEY)
    calls = []

    def fetch(kernel_id, timeout_s):
        calls.append(kernel_id)
        return data

    loader = KernelLoader(fetch, TrustedKeys([KEY]), tmp_path / "c")
    loader.load(kid, 5.0)
    path = loader.path_for(kid)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = KernelLoader(fetch, TrustedKeys([KEY]), tmp_path / "c")
    fresh.load(kid, 5.0)
    assert calls == [kid, kid]
    assert fresh.stats.disk_evictions == 1 and fresh.stats.fetches == 1
    assert path.read_bytes() == data
