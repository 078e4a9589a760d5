"""Tezzeret publishes its public key only where it may: never into a read-only mount
(deploy/k8s gives Urza and the workers the key through a ConfigMap made by the operator)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.core import publish_public_key, trusted_keys_dir

KEY = SigningKey.from_bytes(b"77" * 32)


def _publish(tmp_path: Path, cfg: TezzeretConfig) -> Path | None:
    return publish_public_key(trusted_keys_dir(cfg, tmp_path / "data"), KEY)


def test_publishes_into_a_writable_directory(tmp_path: Path) -> None:
    cfg = TezzeretConfig(trusted_keys_dir=str(tmp_path / "keys"))
    path = _publish(tmp_path, cfg)
    assert path is not None and path.name == f"tezzeret-{KEY.key_id}.pub"
    assert KEY.key_id in TrustedKeys.from_dir(tmp_path / "keys")


def test_a_key_already_trusted_there_is_not_written_again(tmp_path: Path, caplog) -> None:
    keys = tmp_path / "configmap"
    keys.mkdir()
    (keys / "tezzeret.pub").write_bytes(KEY.public_pem())  # what the operator's ConfigMap holds
    before = sorted(p.name for p in keys.iterdir())
    with caplog.at_level(logging.INFO, logger="esper.tezzeret.core"):
        assert _publish(tmp_path, TezzeretConfig(trusted_keys_dir=str(keys))) is None
    assert sorted(p.name for p in keys.iterdir()) == before
    assert "already trusted" in caplog.text


def test_a_read_only_directory_is_skipped_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    keys = tmp_path / "secret-mount"
    keys.mkdir()

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == keys:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    # As root a chmod would not stop the write; a read-only mount does, like this.
    monkeypatch.setattr(os, "open", read_only)
    with caplog.at_level(logging.WARNING, logger="esper.tezzeret.core"):
        assert _publish(tmp_path, TezzeretConfig(trusted_keys_dir=str(keys))) is None
    assert "cannot publish signing key" in caplog.text and KEY.key_id in caplog.text
    assert list(keys.iterdir()) == []


def test_other_errors_are_not_hidden(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(OSError):
        _publish(tmp_path, TezzeretConfig(trusted_keys_dir=str(not_a_dir / "keys")))
