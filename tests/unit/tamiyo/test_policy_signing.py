"""GNN policy files are signed and verified like kernels (Ed25519, `TrustedKeys`).

The weights' SHA-256 pin guards integrity only while the pin itself is trusted: editing
the weights and recomputing the pin must be refused, and so must a policy signed by a key
the loader does not trust — at load, at the service's start and on hot reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.errors import ConfigError, UntrustedKeyError
from esper.tamiyo.gnn import (
    Ensemble,
    NetConfig,
    PolicySignatureError,
    UntrustedPolicyKeyError,
    load_policy,
    save_policy,
    signing_key_for,
    trusted_keys_for,
)
from tests.unit.tamiyo.snapshots import candidate

OPERATOR = SigningKey.from_bytes(b"a1" * 32)
STRANGER = SigningKey.from_bytes(b"b2" * 32)


def _ensemble(seed: int = 0) -> Ensemble:
    return Ensemble(NetConfig(hidden=16, heads=2, members=2), vocab=[candidate("a", 1).blueprint_id], seed=seed)


def _repin(policy: Path) -> None:
    """An attacker's edit: new weights, and the JSON's pin recomputed to match them."""
    weights = policy.with_suffix(".safetensors")
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(weights.read_bytes())
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    data = st_save(tensors, metadata={"format": "esper.tamiyo.gnn", "version": "evil"})
    weights.write_bytes(data)
    config = json.loads(policy.read_text())
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    policy.write_text(json.dumps(config))


def test_a_policy_signed_by_a_trusted_key_loads_bit_for_bit(tmp_path: Path) -> None:
    ens = _ensemble()
    path = save_policy(ens, tmp_path / "gnn.json", version="v1", signing_key=OPERATOR)
    sig = json.loads(path.read_text())["signature"]
    assert sig["key_id"] == OPERATOR.key_id and len(bytes.fromhex(sig["ed25519"])) == 64
    loaded, meta = load_policy(path, TrustedKeys([OPERATOR]))
    assert meta["version"] == "v1"
    for (k, a), b in zip(ens.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_policy_signed_by_an_untrusted_key_is_refused(tmp_path: Path) -> None:
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=STRANGER)
    with pytest.raises(UntrustedPolicyKeyError, match=STRANGER.key_id) as e:
        load_policy(path, TrustedKeys([OPERATOR]))
    assert isinstance(e.value, UntrustedKeyError)  # the same error type a kernel loader raises
    assert OPERATOR.key_id in str(e.value) and "not trusted" in str(e.value)
    with pytest.raises(UntrustedPolicyKeyError):
        load_policy(path, TrustedKeys())


def test_weights_edited_with_a_recomputed_pin_are_refused(tmp_path: Path) -> None:
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=OPERATOR)
    _repin(path)
    with pytest.raises(PolicySignatureError, match="signature does not verify.*changed after signing"):
        load_policy(path, TrustedKeys([OPERATOR]))


@pytest.mark.parametrize("edit", ["drop", "garble", "other_key_id", "version"])
def test_a_missing_or_altered_signature_is_refused(tmp_path: Path, edit: str) -> None:
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=OPERATOR)
    config = json.loads(path.read_text())
    if edit == "drop":
        del config["signature"]
        error, match = PolicySignatureError, "has no signature"
    elif edit == "garble":
        config["signature"]["ed25519"] = "zz" + config["signature"]["ed25519"][2:]
        error, match = PolicySignatureError, "does not verify"
    elif edit == "other_key_id":
        config["signature"]["key_id"] = STRANGER.key_id
        error, match = PolicySignatureError, "does not verify"
    else:
        config["version"] = "v9"  # a relabelled policy is a changed policy
        error, match = PolicySignatureError, "does not verify"
    path.write_text(json.dumps(config))
    trusted = TrustedKeys([OPERATOR, STRANGER])
    with pytest.raises(error, match=match):
        load_policy(path, trusted)


def test_an_unsigned_v1_policy_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=OPERATOR)
    config = json.loads(path.read_text())
    del config["signature"]
    config["format_version"] = 1
    path.write_text(json.dumps(config))
    with pytest.raises(PolicySignatureError, match="unsigned policy file.*esper tamiyo train"):
        load_policy(path, TrustedKeys([OPERATOR]))


def test_the_signing_key_is_found_like_tezzeret_finds_its_kernel_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ESPER_SIGNING_KEY", raising=False)
    monkeypatch.delenv("ESPER_SIGNING_KEY_FILE", raising=False)
    monkeypatch.delenv("ESPER_TRUSTED_KEYS_DIR", raising=False)
    data = tmp_path / "platform"
    # 3. Nothing given: the data dir's Tezzeret key, created once, its public key published.
    key, pub = signing_key_for(data_dir=data)
    assert (data / "tezzeret" / "signing_key.pem").is_file()
    assert pub == data / "trusted_keys" / f"tezzeret-{key.key_id}.pub"
    again, _ = signing_key_for(data_dir=data)
    assert again.key_id == key.key_id
    assert key.key_id in trusted_keys_for(data_dir=data)
    # 2. The environment wins over the data dir.
    monkeypatch.setenv("ESPER_SIGNING_KEY", "a1" * 32)
    assert signing_key_for(data_dir=data)[0].key_id == OPERATOR.key_id
    # 1. An explicit file wins over the environment.
    f = tmp_path / "op.pem"
    STRANGER.save(f)
    assert signing_key_for(f, data_dir=data)[0].key_id == STRANGER.key_id
    with pytest.raises(ConfigError, match="does not exist"):
        signing_key_for(tmp_path / "missing.pem", data_dir=data)
    # Trusted keys: an explicit directory, else ESPER_TRUSTED_KEYS_DIR, else the data dir's.
    other = tmp_path / "other-keys"
    other.mkdir()
    (other / "op.pub").write_bytes(OPERATOR.public_pem())
    assert trusted_keys_for(other, data_dir=data).key_ids == [OPERATOR.key_id]
    monkeypatch.setenv("ESPER_TRUSTED_KEYS_DIR", str(other))
    assert trusted_keys_for(data_dir=data).key_ids == [OPERATOR.key_id]
    monkeypatch.delenv("ESPER_TRUSTED_KEYS_DIR")
    with pytest.raises(ConfigError, match="trusted keys"):
        trusted_keys_for(data_dir=None)


def _trust(data_dir: Path, *keys: SigningKey) -> None:
    d = data_dir / "trusted_keys"
    d.mkdir(parents=True, exist_ok=True)
    for k in keys:
        (d / f"tezzeret-{k.key_id}.pub").write_bytes(k.public_pem())


def test_the_service_refuses_to_start_on_an_untrusted_or_repinned_policy(tmp_path: Path, monkeypatch) -> None:
    from esper.runtime.spec import PlatformContext
    from esper.tamiyo.service import create_service

    monkeypatch.delenv("ESPER_TRUSTED_KEYS_DIR", raising=False)
    _trust(tmp_path, OPERATOR)
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=STRANGER)
    settings = {"tamiyo": {"policy": "gnn", "gnn": {"policy_file": str(path)}}}
    with pytest.raises(UntrustedPolicyKeyError, match=STRANGER.key_id):
        create_service(PlatformContext(data_dir=tmp_path, settings=settings))
    save_policy(_ensemble(), path, version="v1", signing_key=OPERATOR)
    _repin(path)
    with pytest.raises(PolicySignatureError):
        create_service(PlatformContext(data_dir=tmp_path, settings=settings))
    # tamiyo.gnn.trusted_keys_dir names the directory explicitly.
    save_policy(_ensemble(), path, version="v1", signing_key=STRANGER)
    keys = tmp_path / "keys"
    _trust(keys, STRANGER)
    settings["tamiyo"]["gnn"]["trusted_keys_dir"] = str(keys / "trusted_keys")
    create_service(PlatformContext(data_dir=tmp_path, settings=settings))


async def test_hot_reload_verifies_the_signature_and_keeps_serving_on_failure(tmp_path: Path, monkeypatch) -> None:
    from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
    from tests.unit.tamiyo.test_service import CatalogUrza, Platform

    monkeypatch.delenv("ESPER_TRUSTED_KEYS_DIR", raising=False)
    _trust(tmp_path, OPERATOR)
    path = save_policy(_ensemble(), tmp_path / "gnn.json", version="v1", signing_key=OPERATOR)
    settings = {"policy": "gnn", "gnn": {"policy_file": str(path)}, "reload_check_s": 0.05}

    async def info_when(p, ok, timeout_s: float = 10.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
            if ok(info) or asyncio.get_running_loop().time() > deadline:
                return info
            await asyncio.sleep(0.05)

    async with Platform(tmp_path, CatalogUrza([]), settings) as p:
        assert (await info_when(p, lambda i: True)).policy_version == "v1"
        # v2 signed by a stranger: never serves.
        save_policy(_ensemble(seed=3), path, version="v2", signing_key=STRANGER)
        info = await info_when(p, lambda i: "reload_error" in i.settings)
        assert info.policy_version == "v1" and STRANGER.key_id in info.settings["reload_error"]
        assert "UntrustedPolicyKeyError" in info.settings["reload_error"]
        # v3 signed by the operator, then re-pinned weights: v3 serves, the edit does not.
        save_policy(_ensemble(seed=4), path, version="v3", signing_key=OPERATOR)
        info = await info_when(p, lambda i: i.policy_version == "v3")
        assert info.policy_version == "v3"
        _repin(path)
        info = await info_when(p, lambda i: "reload_error" in i.settings)
        assert info.policy_version == "v3" and "PolicySignatureError" in info.settings["reload_error"]
