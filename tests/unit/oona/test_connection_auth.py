"""Oona's connection settings (several URLs, NATS users from the environment, replicas) and
the NATS users' permissions as written into nats.conf."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from esper.errors import ConfigError
from esper.oona.auth import ROLES, CredentialsDir, authorization_block, password_env
from esper.oona.connection import (
    NatsCredentials,
    OonaConfig,
    connect_options,
    display_servers,
    parse_servers,
    stream_replicas_from_env,
)
from esper.oona.natsd import NatsServer, NatsServerConfig
from esper.oona.publisher import PublisherConfig
from esper.oona.subjects import DEFAULT_STREAMS, EVENTS_STREAM, StreamSpec, with_replicas


def test_several_urls_comma_separated_or_as_a_list() -> None:
    urls = "nats://a:4222, nats://b:4222 ,tls://c:4443,"
    assert parse_servers(urls) == ("nats://a:4222", "nats://b:4222", "tls://c:4443")
    assert parse_servers(["nats://a:1"]) == ("nats://a:1",)


@pytest.mark.parametrize("bad", ["", " , ", "a:4222", "http://a:80", "nats://", "nats://a:port"])
def test_bad_url_lists_name_the_entry(bad: str) -> None:
    with pytest.raises(ConfigError, match="NATS URL"):
        parse_servers(bad)


def test_passwords_in_urls_are_masked_for_logs() -> None:
    assert display_servers(["nats://u:secret@a:4222", "nats://b:1"]) == "nats://***@a:4222,nats://b:1"


def test_credentials_come_from_user_and_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    env = {"ESPER_NATS_USER": "tolaria", "ESPER_NATS_PASSWORD_FILE": str(pw)}
    creds = NatsCredentials.from_env(env)
    assert creds is not None and (creds.user, creds.password) == ("tolaria", "s3cret")
    assert "s3cret" not in repr(creds)
    opts = connect_options("nats://a:1,nats://b:2", creds)
    assert opts == {"servers": ["nats://a:1", "nats://b:2"], "user": "tolaria",
                    "password": "s3cret", "inbox_prefix": "_INBOX_tolaria"}
    assert NatsCredentials.from_env({}) is None
    with pytest.raises(ConfigError, match="ESPER_NATS_PASSWORD_FILE"):
        NatsCredentials.from_env({"ESPER_NATS_USER": "tolaria"})
    with pytest.raises(ConfigError, match="cannot be read"):
        NatsCredentials.from_env({**env, "ESPER_NATS_PASSWORD_FILE": str(tmp_path / "none")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        NatsCredentials.from_file("tolaria", tmp_path / "empty")


def test_oona_config_from_env_and_dict(tmp_path: Path) -> None:
    cfg = OonaConfig.from_env({"ESPER_NATS_URL": "nats://a:1,nats://b:2",
                               "ESPER_NATS_STREAM_REPLICAS": "3"})
    assert cfg.servers == ("nats://a:1", "nats://b:2") and cfg.stream_replicas == 3
    assert cfg.credentials() is None
    assert OonaConfig.from_dict({"servers": ["nats://a:1"]}).servers == ("nats://a:1",)
    assert OonaConfig.from_dict({"servers": "nats://a:1,nats://b:1"}).servers[1] == "nats://b:1"
    with pytest.raises(ConfigError, match="unknown oona settings"):
        OonaConfig.from_dict({"server": "nats://a:1"})
    with pytest.raises(ValueError, match="both or neither"):
        OonaConfig(user="tolaria")
    with pytest.raises(ConfigError, match="ESPER_NATS_STREAM_REPLICAS"):
        stream_replicas_from_env({"ESPER_NATS_STREAM_REPLICAS": "2"})
    assert stream_replicas_from_env({}) is None


def test_stream_replicas_none_means_keep_and_creates_r1() -> None:
    assert EVENTS_STREAM.replicas is None and EVENTS_STREAM.to_nats().num_replicas == 1
    r3 = with_replicas(3)
    assert [s.replicas for s in r3] == [3, 3] and r3[0].to_nats().num_replicas == 3
    assert [s.name for s in r3] == [s.name for s in DEFAULT_STREAMS]
    with pytest.raises(ConfigError, match="replicas"):
        StreamSpec.from_dict({**EVENTS_STREAM.__dict__, "replicas": 2})


def test_publisher_config_stall_and_stream_modes() -> None:
    assert PublisherConfig().ensure_streams == "create"
    with pytest.raises(ValueError, match="ensure_streams"):
        PublisherConfig(ensure_streams=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stall_after_s"):
        PublisherConfig(stall_after_s=0)


def _conf_users(text: str) -> dict[str, str]:
    return dict(re.findall(r"\{user: (\w+), password: ([^,}]+)", text))


def test_authorization_block_lists_every_role_with_its_permissions() -> None:
    text = authorization_block()
    assert set(_conf_users(text)) == set(ROLES)
    assert _conf_users(text)["tolaria"] == f"${password_env('tolaria')}"
    tolaria = next(line for line in text.splitlines() if "user: tolaria" in line)
    # Tolaria publishes run events and telemetry and may look the streams up; it may not
    # create, change or delete them, nor publish Tezzeret's kernel announcements.
    assert '"esper.events.v1.>"' in tolaria and '"esper.telemetry.v1.>"' in tolaria
    assert "STREAM.CREATE" not in tolaria and "STREAM.DELETE" not in tolaria
    assert "esper.kernels" not in tolaria and '"_INBOX_tolaria.>"' in tolaria
    reader = next(line for line in text.splitlines() if "user: reader" in line)
    assert "esper.events.v1" not in reader.split("subscribe")[0]  # reads only through consumers
    admin = next(line for line in text.splitlines() if "user: admin" in line)
    assert "permissions" not in admin
    literal = authorization_block({r: f"pw-{r}" for r in ROLES})
    assert _conf_users(literal)["reader"] == '"pw-reader"'
    with pytest.raises(ConfigError, match="no password"):
        authorization_block({"admin": "x"})


def test_credentials_dir_creates_private_files_once(tmp_path: Path) -> None:
    d = CredentialsDir(tmp_path / "creds")
    first = d.ensure()
    assert set(first) == set(ROLES) and len(set(first.values())) == len(ROLES)
    for role in ROLES:
        mode = stat.S_IMODE(d.password_file(role).stat().st_mode)
        assert mode == 0o600, (role, oct(mode))
    assert d.ensure() == first  # reused: a restarted server keeps its users
    env = d.client_env("tolaria")
    assert NatsCredentials.from_env(env) == d.credentials("tolaria")
    with pytest.raises(ConfigError, match="unknown NATS role"):
        d.password_file("tezzeret")


def test_server_config_with_users_is_private_and_refuses_anonymous(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, users={r: f"pw-{r}" for r in ROLES})
    server._write_config()
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    text = server.config_path.read_text()
    assert "authorization {" in text and '"pw-tolaria"' in text and "no_auth_user" not in text


def test_cluster_settings_are_checked() -> None:
    ok = NatsServerConfig(server_name="n0", cluster_name="esper", cluster_port=6222,
                          routes=("nats://127.0.0.1:6222",))
    assert ok.cluster_name == "esper"
    with pytest.raises(ValueError, match="server_name"):
        NatsServerConfig(cluster_name="esper", cluster_port=6222, routes=("nats://a:1",))
    with pytest.raises(ValueError, match="cluster_port"):
        NatsServerConfig(server_name="n0", cluster_name="esper", routes=("nats://a:1",))
    with pytest.raises(ValueError, match="without cluster_name"):
        NatsServerConfig(routes=("nats://a:1",))
    with pytest.raises(ValueError, match="restart_backoff_s"):
        NatsServerConfig(restart_backoff_s=5.0, restart_backoff_max_s=1.0)
    assert NatsServerConfig.from_dict({"routes": ["nats://a:1"], "cluster_name": "c",
                                       "server_name": "n", "cluster_port": 1}).routes == ("nats://a:1",)
