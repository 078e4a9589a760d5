"""Key material and the loader's prefetch, pinned (mutants of artifact.py / loader.py that
survived the suite): a `.pem` key in the trusted directory is trusted, the process
environment is read by default, prefetch really warms the caches, and every key-file
error names the file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.errors import ConfigError
from esper.kasmina.loader import KernelLoader

sys.path.insert(0, str(Path(__file__).parent))
import malicious

KEY = SigningKey.from_bytes(b"44" * 32)
OTHER = SigningKey.from_bytes(b"45" * 32)


def test_prefetch_verifies_and_caches_the_kernel_so_load_does_not_fetch(tmp_path: Path) -> None:
    kid, data = malicious.genuine(KEY)
    calls: list[tuple[str, float]] = []

    def fetch(kernel_id: str, timeout_s: float) -> bytes:
        calls.append((kernel_id, timeout_s))
        return data

    loader = KernelLoader(fetch, TrustedKeys([KEY]), tmp_path)
    loader.prefetch(kid, 5.0)
    assert [k for k, _ in calls] == [kid] and 0 < calls[0][1] <= 5.0
    assert loader.stats.fetches == 1 and loader.path_for(kid).read_bytes() == data
    loader.load(kid, 5.0)
    assert len(calls) == 1 and loader.stats.memory_hits == 1


def test_trusted_keys_dir_trusts_pub_and_pem_files_only(tmp_path: Path) -> None:
    (tmp_path / "a.pub").write_text(KEY.public_raw.hex())
    (tmp_path / "b.pem").write_bytes(OTHER.public_pem())
    (tmp_path / "c.txt").write_bytes(SigningKey.generate().public_pem())
    (tmp_path / "d.pub.bak").write_bytes(SigningKey.generate().public_pem())
    assert TrustedKeys.from_dir(tmp_path).key_ids == sorted([KEY.key_id, OTHER.key_id])


def test_trusted_keys_from_env_reads_the_process_environment(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "k.pem").write_bytes(KEY.public_pem())
    monkeypatch.setenv("ESPER_TRUSTED_KEYS_DIR", str(tmp_path))
    assert TrustedKeys.from_env().key_ids == [KEY.key_id]
    monkeypatch.delenv("ESPER_TRUSTED_KEYS_DIR")
    with pytest.raises(ConfigError, match=r"^no trusted keys: set ESPER_TRUSTED_KEYS_DIR to a directory of "
                                          r"Ed25519 public keys \(\*\.pub or \*\.pem\)$"):
        TrustedKeys.from_env()


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"^trusted keys directory '{missing}' does not exist$"):
        TrustedKeys.from_dir(missing)
    with pytest.raises(ConfigError, match=rf"^signing key file '{missing}' does not exist$"):
        SigningKey.from_file(missing)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match=rf"^{bad}: not an Ed25519 private key"):
        SigningKey.from_file(bad)
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(ecdsa)
    # (The message comes wrapped twice today: add_file's ConfigError is a ValueError its own
    # `except ValueError` re-wraps. It still names the file and the key type.)
    with pytest.raises(ConfigError, match=rf"^{wrong}: .*PEM key is \w+PublicKey, not Ed25519$"):
        TrustedKeys().add_file(wrong)


def test_the_signed_manifest_carries_what_the_kernel_was_built_from(tmp_path: Path) -> None:
    from esper.blueprints import blueprint_id, build_module, builtin_blueprints
    from esper.blueprints.artifact import pack_kernel, verify_artifact
    from generated.esper.common.v1 import kernel_pb2

    bp = next(b for b in builtin_blueprints() if b.name == "conv3x3_residual")
    unnamed = type(bp)()
    unnamed.CopyFrom(bp)
    unnamed.blueprint_id = ""  # an id is computed when the blueprint has none
    profile = kernel_pb2.KernelProfile(parameters=123, latency_us_p50=4.5)
    report = kernel_pb2.ValidationReport(shape_ok=True, forward_finite=True, init_max_abs_delta=0.0)
    kid, data = pack_kernel(unnamed, malicious.SITE, build_module(bp, malicious.SITE), profile, report, KEY,
                            tags=["b", "a", "b"])
    m = verify_artifact(data, TrustedKeys([KEY]), expected_kernel_id=kid).manifest
    assert m.blueprint_id == blueprint_id(bp) == bp.blueprint_id
    assert (m.blueprint_name, m.family) == (bp.name, bp.family) and m.family
    assert m.profile == profile and m.validation == report
    assert list(m.tags) == ["a", "b"] and m.key_id == KEY.key_id and m.site == malicious.SITE


def test_a_signing_key_saved_into_a_new_nested_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "key.pem"
    KEY.save(path)
    assert SigningKey.from_file(path).key_id == KEY.key_id
    assert path.stat().st_mode & 0o777 == 0o600


def test_signing_key_parse_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^ENV_X: not an Ed25519 private key \(PEM PKCS#8 or 64 hex chars\): "):
        SigningKey.from_bytes(b"zz", source="ENV_X")
    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ConfigError, match=r"ENV_X: PEM key is \w+PrivateKey, not Ed25519"):
        SigningKey.from_bytes(ecdsa, source="ENV_X")


def test_signing_key_from_env_reads_the_process_environment_and_names_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY_FILE", raising=False)
    monkeypatch.setenv("ESPER_SIGNING_KEY", "44" * 32)
    assert SigningKey.from_env().key_id == KEY.key_id
    monkeypatch.setenv("ESPER_SIGNING_KEY", "not-hex")
    with pytest.raises(ConfigError, match=r"^ESPER_SIGNING_KEY: not an Ed25519 private key"):
        SigningKey.from_env()
    monkeypatch.delenv("ESPER_SIGNING_KEY")
    with pytest.raises(ConfigError, match=r"^no signing key: set ESPER_SIGNING_KEY \(PEM or 64 hex chars\) or "
                                          r"ESPER_SIGNING_KEY_FILE \(path to a PEM file\)$"):
        SigningKey.from_env()
