"""Tezzeret publishes its public key only where it may: never into a read-only mount
(deploy/k8s gives Urza and the workers the key through a ConfigMap made by the operator)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.runtime.spec import PlatformContext
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.service import publish_public_key

KEY = SigningKey.from_bytes(b"77" * 32)


def _ctx(tmp_path: Path) -> PlatformContext:
    return PlatformContext(data_dir=tmp_path / "data")


def test_publishes_into_a_writable_directory(tmp_path: Path) -> None:
    cfg = TezzeretConfig(trusted_keys_dir=str(tmp_path / "keys"))
    path = publish_public_key(_ctx(tmp_path), cfg, KEY)
    assert path is not None and path.name == f"tezzeret-{KEY.key_id}.pub"
    assert KEY.key_id in TrustedKeys.from_dir(tmp_path / "keys")


def test_a_key_already_trusted_there_is_not_written_again(tmp_path: Path, caplog) -> None:
    keys = tmp_path / "configmap"
    keys.mkdir()
    (keys / "tezzeret.pub").write_bytes(KEY.public_pem())  # what the operator's ConfigMap holds
    before = sorted(p.name for p in keys.iterdir())
    with caplog.at_level(logging.INFO, logger="esper.tezzeret.service"):
        assert publish_public_key(_ctx(tmp_path), TezzeretConfig(trusted_keys_dir=str(keys)), KEY) is None
    assert sorted(p.name for p in keys.iterdir()) == before
    assert "already trusted" in caplog.text


def test_a_read_only_directory_is_skipped_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    keys = tmp_path / "secret-mount"
    keys.mkdir()

    def read_only(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    # As root a chmod would not stop the write; a read-only mount does, like this.
    monkeypatch.setattr(Path, "write_bytes", read_only)
    with caplog.at_level(logging.WARNING, logger="esper.tezzeret.service"):
        assert publish_public_key(_ctx(tmp_path), TezzeretConfig(trusted_keys_dir=str(keys)), KEY) is None
    assert "cannot publish signing key" in caplog.text and KEY.key_id in caplog.text
    assert list(keys.iterdir()) == []


def test_other_errors_are_not_hidden(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(OSError):
        publish_public_key(_ctx(tmp_path), TezzeretConfig(trusted_keys_dir=str(not_a_dir / "keys")), KEY)
