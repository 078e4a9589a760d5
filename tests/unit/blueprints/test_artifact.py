"""Artifact packing, signing keys, trusted keys, verification round trip."""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import build_module, builtin_blueprints, site_signature
from esper.blueprints.artifact import (
    SigningKey,
    TrustedKeys,
    kernel_id_of,
    materialize,
    pack_kernel,
    verify_artifact,
)
from esper.errors import ArtifactError, ConfigError
from generated.esper.common.v1 import kernel_pb2

SITE = site_signature("NLD", 8, (4,))


def _pack(key, seed=0):
    bp = next(b for b in builtin_blueprints() if b.name == "bottleneck_mlp")
    m = build_module(bp, SITE, seed=seed)
    return m, *pack_kernel(bp, SITE, m, kernel_pb2.KernelProfile(parameters=9),
                           kernel_pb2.ValidationReport(shape_ok=True), key, tags=["b", "a"])


def test_roundtrip_is_exact_and_deterministic():
    key = SigningKey.generate()
    m, kid, data = _pack(key)
    _, kid2, data2 = _pack(key)
    assert (kid, data) == (kid2, data2)
    assert kid != _pack(key, seed=1)[1]
    vk = verify_artifact(data, TrustedKeys([key]), expected_kernel_id=kid)
    assert vk.kernel_id == kid == kernel_id_of(kernel_pb2.KernelArtifact.FromString(data).manifest)
    assert list(vk.manifest.tags) == ["a", "b"]
    assert vk.manifest.key_id == key.key_id and len(key.key_id) == 16
    assert [t.name for t in vk.manifest.tensors] == sorted(m.state_dict())
    rebuilt = materialize(vk)
    for k, v in m.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_pack_refuses_a_module_that_does_not_match_the_ir():
    key = SigningKey.generate()
    bp = next(b for b in builtin_blueprints() if b.name == "bottleneck_mlp")
    wrong = build_module(bp, site_signature("NLD", 16, (4,)))
    with pytest.raises(ArtifactError, match="do not match the IR"):
        pack_kernel(bp, SITE, wrong, kernel_pb2.KernelProfile(), kernel_pb2.ValidationReport(),
                    key)


def test_signing_key_sources(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "k" / "signing.pem"
    key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SigningKey.from_file(path).key_id == key.key_id
    assert SigningKey.from_env({"ESPER_SIGNING_KEY_FILE": str(path)}).key_id == key.key_id
    hexkey = SigningKey.from_env({"ESPER_SIGNING_KEY": "ab" * 32})
    assert hexkey.key_id == SigningKey.from_bytes(b"ab" * 32).key_id
    assert SigningKey.load_or_create(tmp_path / "new.pem").key_id == \
        SigningKey.load_or_create(tmp_path / "new.pem").key_id
    with pytest.raises(ConfigError, match="ESPER_SIGNING_KEY"):
        SigningKey.from_env({})
    with pytest.raises(ConfigError, match="32 bytes, got 3"):
        SigningKey.from_bytes(b"abcdef")
    with pytest.raises(ConfigError, match="does not exist"):
        SigningKey.from_file(tmp_path / "missing.pem")


def test_trusted_keys_from_dir(tmp_path):
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    (tmp_path / "a.pub").write_bytes(a.public_pem())
    (tmp_path / "b.pub").write_text(b.public_raw.hex())
    (tmp_path / "c.txt").write_text(c.public_raw.hex())  # not a key file by name: ignored
    tk = TrustedKeys.from_env({"ESPER_TRUSTED_KEYS_DIR": str(tmp_path)})
    assert tk.key_ids == sorted([a.key_id, b.key_id])
    assert c.key_id not in tk
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="bad.pub"):
        TrustedKeys.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="ESPER_TRUSTED_KEYS_DIR"):
        TrustedKeys.from_env({})


def test_oversized_artifact_refused_before_parsing():
    with pytest.raises(ArtifactError, match="bound is 100"):
        verify_artifact(b"\0" * 101, TrustedKeys(), max_size=100)
