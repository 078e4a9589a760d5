"""API key parsing and scope checks; platform config loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.errors import ConfigError
from esper.runtime.auth import AuthConfig, KeyChecker, key_from_metadata, parse_keys
from esper.runtime.config import PlatformConfig

K1 = "k1-0123456789abcdef"
K2 = "k2-0123456789abcdef"


def test_parse_keys_reads_scopes_per_key() -> None:
    keys = parse_keys(f"{K1}=urza:read,tamiyo:*; {K2}=*", source="env")
    assert keys == {K1: frozenset({"urza:read", "tamiyo:*"}), K2: frozenset({"*"})}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (K1, "no '='"),
        ("short=*", "at least 16"),
        (f"{K1}=urza:delete", "urza:delete"),
        (f"{K1}=", "invalid scopes"),
        (f"{K1}=*;{K1}=urza:read", "listed twice"),
    ],
)
def test_parse_keys_rejects_bad_entries(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_keys(text, source="ESPER_API_KEYS")


def test_auth_needs_keys_unless_explicitly_disabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no API keys configured"):
        AuthConfig.from_env({})
    assert AuthConfig.from_env({}, disabled=True).disabled
    f = tmp_path / "keys"
    f.write_text(f"# comment\n{K1}=urza:read\n\n{K2}=*  # admin\n")
    cfg = AuthConfig.from_env({"ESPER_API_KEYS_FILE": str(f), "ESPER_API_KEYS": "env-key-0123456789=karn:read"})
    assert set(cfg.keys) == {K1, K2, "env-key-0123456789"}
    with pytest.raises(ConfigError, match="cannot be read"):
        AuthConfig.from_env({"ESPER_API_KEYS_FILE": str(tmp_path / "missing")})


def test_key_checker_scopes() -> None:
    checker = KeyChecker(AuthConfig(keys={K1: frozenset({"urza:read", "tamiyo:*"}), K2: frozenset({"*"})}))
    s1 = checker.scopes_for(K1)
    assert s1 is not None
    assert checker.allows(s1, "urza", write=False)
    assert not checker.allows(s1, "urza", write=True)
    assert checker.allows(s1, "tamiyo", write=True)
    assert not checker.allows(s1, "karn", write=False)
    assert checker.scopes_for(K1 + "x") is None
    assert checker.scopes_for("") is None
    s2 = checker.scopes_for(K2)
    assert s2 is not None and checker.allows(s2, "tolaria", write=True)


def test_key_from_metadata_prefers_x_api_key_then_bearer() -> None:
    assert key_from_metadata((("x-api-key", K1), ("authorization", f"Bearer {K2}"))) == K1
    assert key_from_metadata((("authorization", f"Bearer {K2}"),)) == K2
    assert key_from_metadata((("authorization", f"Basic {K2}"),)) is None
    assert key_from_metadata(()) is None


def test_platform_config_yaml_env_and_unknown_keys(tmp_path: Path) -> None:
    f = tmp_path / "esper.yaml"
    f.write_text("data_dir: /tmp/x\nbase_port: 5000\nsettings:\n  urza: {database_url: 'sqlite://'}\n")
    cfg = PlatformConfig.load(f, env={"ESPER_BASE_PORT": "6000", "ESPER_LOG_LEVEL": "debug"})
    assert cfg.data_dir == Path("/tmp/x") and cfg.base_port == 6000 and cfg.log_level == "DEBUG"
    assert cfg.settings["urza"]["database_url"] == "sqlite://"
    assert cfg.with_overrides(base_port=None, host="0.0.0.0").host == "0.0.0.0"

    f.write_text("data_dri: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"unknown platform config keys \['data_dri'\]"):
        PlatformConfig.load(f, env={})
    with pytest.raises(ConfigError, match="base_port"):
        PlatformConfig.from_dict({"base_port": 70000})
    with pytest.raises(ConfigError, match="ESPER_GRACE_S"):
        PlatformConfig.load(None, env={"ESPER_GRACE_S": "soon"})
    with pytest.raises(ConfigError, match="unknown parts"):
        PlatformConfig.from_dict({"settings": {"urzaa": {}}})


def test_part_settings_from_the_environment_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "esper.yaml"
    f.write_text("settings:\n  urza: {database_url: 'postgresql://file/db', chunk_size: 1024}\n")
    cfg = PlatformConfig.load(f, env={
        "ESPER_URZA_DATABASE_URL": "postgresql://esper@postgres:5432/urza",
        "ESPER_TOLARIA_SUPERVISOR": "{max_active_runs: 2}",
        "ESPER_URZA_S3_REGION": "on",  # a word stays a word, not YAML's boolean
        "ESPER_TRUSTED_KEYS_DIR": "/keys",  # not a part: left to its own reader
    })
    assert dict(cfg.settings["urza"]) == {"database_url": "postgresql://esper@postgres:5432/urza",
                                          "chunk_size": 1024, "s3_region": "on"}
    assert cfg.settings["tolaria"] == {"supervisor": {"max_active_runs": 2}}
    assert set(cfg.settings) == {"urza", "tolaria"}
    # A misspelt key is refused by the part, naming it.
    from esper.urza.config import UrzaConfig

    typo = PlatformConfig.load(None, env={"ESPER_URZA_BLOB_DIRR": "/data/blobs"})
    with pytest.raises(ConfigError, match="blob_dirr"):
        UrzaConfig.from_dict(dict(typo.settings["urza"]))
    with pytest.raises(ConfigError, match="ESPER_URZA_CHUNK_SIZE"):
        PlatformConfig.load(None, env={"ESPER_URZA_CHUNK_SIZE": "{unclosed"})


def test_the_readme_key_example_works_as_printed() -> None:
    import re

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    m = re.search(r"export ESPER_API_KEYS='([^']+)'", readme)
    assert m is not None, "README shows no ESPER_API_KEYS example"
    cfg = AuthConfig.from_env({"ESPER_API_KEYS": m.group(1)})
    assert len(cfg.keys) == 2 and frozenset({"*"}) in cfg.keys.values()


def test_short_keys_are_refused_with_the_rule_and_how_to_make_one() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_keys("key=*", source="ESPER_API_KEYS")
    assert "at least 16 characters, got 3" in str(ei.value) and "secrets.token_urlsafe" in str(ei.value)


def test_cli_help_documents_the_key_format() -> None:
    import subprocess
    import sys

    for cmd in ("serve", "up"):
        r = subprocess.run([sys.executable, "-m", "esper.cli", cmd, "--help"], check=True, capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).resolve().parents[3])
        text = " ".join(r.stdout.split())
        assert "at least 16 characters" in text and "ESPER_API_KEYS" in text, r.stdout


def test_key_ids_name_keys_without_revealing_them() -> None:
    from esper.runtime.auth import key_id

    checker = KeyChecker(AuthConfig(keys={K1: frozenset({"*"}), K2: frozenset({"urza:read"})}))
    assert checker.match(K1) == (key_id(K1), frozenset({"*"}))
    assert checker.match("nope" * 5) is None
    assert len(key_id(K1)) == 8 and key_id(K1) != key_id(K2) and key_id(K1) not in K1
