"""esper.runtime.endpoints: `esper up`'s endpoints file and how every command finds a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.errors import ConfigError, UnavailableError
from esper.runtime.endpoints import PlatformInfo, find_part

ADMIN = "a" * 32
KARN = "k" * 32


def _platform(tmp_path: Path, *, auth: bool = True) -> Path:
    keys = tmp_path / "api-keys"
    keys.write_text(f"# comment\n{KARN}=karn:write\n{ADMIN}=*\n")
    PlatformInfo(pid=123, endpoints={"karn": "127.0.0.1:5", "urza": "127.0.0.1:5"},
                 services={"karn": "esper.karn.v1.KarnService"}, nats_url="nats://127.0.0.1:4",
                 api_keys_file=str(keys), auth=auth).write(tmp_path)
    return keys


def test_the_file_round_trips_and_a_missing_file_is_none(tmp_path: Path) -> None:
    assert PlatformInfo.read(tmp_path) is None
    _platform(tmp_path)
    info = PlatformInfo.read(tmp_path)
    assert info is not None and info.pid == 123 and info.endpoints["karn"] == "127.0.0.1:5"
    assert info.nats_url == "nats://127.0.0.1:4" and info.admin_key() == ADMIN
    assert info.key("karn") == ADMIN  # "*" is preferred over "karn:write"


def test_find_part_order_argument_then_environment_then_local_file(tmp_path: Path) -> None:
    _platform(tmp_path)
    got = find_part("karn", endpoint="h:1", data_dir=tmp_path, env={})
    assert (got.target, got.api_key, got.source) == ("h:1", None, "--endpoint")
    got = find_part("karn", data_dir=tmp_path, env={"ESPER_ENDPOINTS": "karn=e:2",
                                                     "ESPER_API_KEY": "env-key"})
    assert (got.target, got.api_key, got.source) == ("e:2", "env-key", "ESPER_ENDPOINTS")
    got = find_part("karn", data_dir=tmp_path, env={})
    assert (got.target, got.api_key) == ("127.0.0.1:5", ADMIN)
    got = find_part("karn", env={"ESPER_DATA_DIR": str(tmp_path), "ESPER_API_KEY": "mine"})
    assert got.api_key == "mine"  # a key given wins over the local file's


def test_no_key_from_the_file_when_auth_is_off_and_errors_say_what_to_do(tmp_path: Path) -> None:
    _platform(tmp_path, auth=False)
    assert find_part("karn", data_dir=tmp_path, env={}).api_key is None
    with pytest.raises(UnavailableError, match="names no tamiyo endpoint"):
        find_part("tamiyo", data_dir=tmp_path, env={})
    with pytest.raises(UnavailableError, match=r"endpoints.json \(start one with `esper up"):
        find_part("karn", data_dir=tmp_path / "none", env={})
    with pytest.raises(ConfigError, match="has no karn=host:port entry"):
        find_part("karn", env={"ESPER_ENDPOINTS": "urza=u:1"})
