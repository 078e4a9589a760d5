from __future__ import annotations

from pathlib import Path

import pytest

from esper.errors import ConfigError, FailedPreconditionError
from esper.oona.natsd import NatsServer, NatsServerConfig, find_binary


def test_defaults_fsync_every_ack() -> None:
    cfg = NatsServerConfig()
    assert cfg.sync_interval == "always"
    assert cfg.port == 0 and cfg.host == "127.0.0.1" and cfg.jetstream


@pytest.mark.parametrize("value", ["1s", "100ms", "1m30s", "2m", "1.5s"])
def test_sync_interval_accepts_go_durations(value: str) -> None:
    assert NatsServerConfig(sync_interval=value).sync_interval == value


@pytest.mark.parametrize("value", ["", "soon", "10", "s", "1x", "always "])
def test_sync_interval_rejects_other_values(value: str) -> None:
    with pytest.raises(ValueError, match="sync_interval"):
        NatsServerConfig(sync_interval=value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"host": ""}, "host"),
        ({"max_store_bytes": 0}, "max_store_bytes"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"stop_timeout_s": -1.0}, "stop_timeout_s"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        NatsServerConfig(**kwargs)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="sync"):
        NatsServerConfig.from_dict({"sync": "always"})
    assert NatsServerConfig.from_dict({"port": 4333}).port == 4333


def test_binary_is_found_in_this_environment() -> None:
    path = find_binary()
    assert path.name == "nats-server" and path.is_file()


def test_binary_override_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ESPER_NATS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(FailedPreconditionError, match="missing"):
        find_binary()


def test_port_unknown_before_start(tmp_path: Path) -> None:
    server = NatsServer(tmp_path)
    with pytest.raises(FailedPreconditionError, match="not been started"):
        _ = server.url


def test_config_and_arguments_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        NatsServer(tmp_path, port=4222, config=NatsServerConfig())


def test_config_file_states_sync_setting(tmp_path: Path) -> None:
    server = NatsServer(
        tmp_path, config=NatsServerConfig(sync_interval="250ms", max_store_bytes=1 << 20)
    )
    server._write_config()
    text = server.config_path.read_text()
    assert "sync_interval: 250ms" in text
    assert "max_file_store: 1048576" in text
    assert '"127.0.0.1:-1"' in text
