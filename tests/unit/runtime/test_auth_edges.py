"""Auth's edges, pinned (mutants of esper/runtime/auth.py that survived the suite).

Keys from the file keep their scopes, the error messages name the entry and the value
(CONVENTIONS: a message says what was wrong and where), a 16-character key is long
enough, comments and '=' inside scopes are parsed as documented.
"""

from __future__ import annotations

import pytest

from esper.errors import ConfigError
from esper.runtime.auth import (
    ENV_KEYS,
    ENV_KEYS_FILE,
    AuthConfig,
    KeyChecker,
    key_from_metadata,
    parse_keys,
)

K1 = "k" * 15 + "1"  # exactly the 16-character minimum
K2 = "0123456789abcdef-two"


def test_a_key_of_exactly_the_minimum_length_is_accepted() -> None:
    assert parse_keys(f"{K1}=urza:read", source="t") == {K1: frozenset({"urza:read"})}
    with pytest.raises(ConfigError, match="at least 16 characters, got 15"):
        parse_keys(f"{K1[:-1]}=urza:read", source="t")


def test_errors_name_the_source_and_the_entry_number() -> None:
    with pytest.raises(ConfigError, match=r"^ESPER_API_KEYS entry 2: expected '<key>=<scope1>,<scope2>', got no '='"):
        parse_keys(f"{K1}=*;nokey", source="ESPER_API_KEYS")
    with pytest.raises(ConfigError, match=r"^/etc/keys entry 3: key ending '\.\.\.b-k1' is listed twice"):
        parse_keys(f"{K2}b-k1=*\n\n{K2}b-k1=urza:read", source="/etc/keys", separator="\n")


def test_invalid_scopes_are_listed_and_the_allowed_forms_named() -> None:
    with pytest.raises(ConfigError) as e:
        parse_keys(f"{K1}=urza:read,bogus", source="t")
    msg = str(e.value)
    assert "invalid scopes ['bogus']" in msg
    assert "allowed: '*', '<part>:read', '<part>:write', '<part>:*' (e.g. 'urza:read,tamiyo:*')" in msg
    # Only the first '=' separates key and scopes.
    with pytest.raises(ConfigError, match=r"invalid scopes \['urza:read=oops'\]"):
        parse_keys(f"{K1}=urza:read=oops", source="t")


def test_everything_after_the_first_hash_is_a_comment() -> None:
    assert parse_keys(f"{K1}=urza:read # note # more", source="t") == {K1: frozenset({"urza:read"})}


def test_keys_from_the_file_keep_their_scopes_and_merge_with_the_variable(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# operators\n{K2}=tamiyo:write,urza:*\n")
    cfg = AuthConfig.from_env({ENV_KEYS: f"{K1}=urza:read", ENV_KEYS_FILE: str(f)})
    assert dict(cfg.keys) == {K1: frozenset({"urza:read"}), K2: frozenset({"tamiyo:write", "urza:*"})}
    checker = KeyChecker(cfg)
    assert checker.allows(checker.scopes_for(K2), "tamiyo", write=True)
    assert not checker.allows(checker.scopes_for(K1), "urza", write=True)


def test_variable_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^ESPER_API_KEYS entry 2: API keys must have at least 16"):
        AuthConfig.from_env({ENV_KEYS: f"{K1}=*;short=*"})


def test_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"ESPER_API_KEYS_FILE='{missing}' cannot be read"):
        AuthConfig.from_env({ENV_KEYS_FILE: str(missing)})
    f = tmp_path / "keys"
    f.write_text("short=*\n")
    with pytest.raises(ConfigError, match=rf"^{f} entry 1: API keys must have"):
        AuthConfig.from_env({ENV_KEYS_FILE: str(f)})
    f.write_text(f"{K1}=*\n")
    with pytest.raises(ConfigError, match=rf"key ending '\.\.\.kkk1' is in both ESPER_API_KEYS and {f}"):
        AuthConfig.from_env({ENV_KEYS: f"{K1}=*", ENV_KEYS_FILE: str(f)})


def test_from_env_reads_the_process_environment_by_default(monkeypatch) -> None:
    monkeypatch.setenv(ENV_KEYS, f"{K1}=karn:read")
    monkeypatch.delenv(ENV_KEYS_FILE, raising=False)
    assert dict(AuthConfig.from_env().keys) == {K1: frozenset({"karn:read"})}


def test_no_keys_and_keys_with_auth_off_are_refused_saying_what_to_do() -> None:
    with pytest.raises(ConfigError) as e:
        AuthConfig()
    assert "set ESPER_API_KEYS='<key>=<scope>,...'" in str(e.value)
    assert "or ESPER_API_KEYS_FILE=<path>" in str(e.value)
    assert "or disable auth explicitly (--insecure-no-auth)" in str(e.value)
    with pytest.raises(ConfigError, match="^auth is disabled but API keys were given; choose one$"):
        AuthConfig(disabled=True, keys={K1: frozenset({"*"})})


def test_a_disabled_config_gives_a_disabled_checker() -> None:
    assert KeyChecker(AuthConfig(disabled=True)).disabled is True
    assert KeyChecker(AuthConfig(keys={K1: frozenset({"*"})})).disabled is False


def test_a_binary_metadata_key_is_decoded_to_text() -> None:
    assert key_from_metadata([("x-api-key", K1.encode())]) == K1
    assert key_from_metadata([("x-api-key", K1)]) == K1
