"""The `esper` command: subcommand registry, endpoints parsing, `esper up`'s key file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from esper import cli
from esper.errors import ConfigError
from esper.runtime import cli as runtime_cli
from esper.runtime.config import PlatformConfig

ROOT = Path(__file__).resolve().parents[3]


def test_every_package_cli_module_is_registered() -> None:
    modules = cli.command_modules()
    assert modules[0] == "esper.runtime.cli"
    on_disk = {f"esper.{p.parent.name}.cli" for p in (ROOT / "esper").glob("*/cli.py")}
    assert set(modules) == on_disk
    sub = cli.build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert {"serve", "up", "status"} <= set(sub.choices)


def test_parse_endpoints() -> None:
    assert runtime_cli.parse_endpoints("urza=u:1, tamiyo=t:2") == {"urza": "u:1", "tamiyo": "t:2"}
    assert runtime_cli.parse_endpoints("") == {}
    for bad in ("urza", "nope=h:1", "urza=host"):
        with pytest.raises(ConfigError, match="part=host:port"):
            runtime_cli.parse_endpoints(bad)


def test_up_creates_a_private_admin_key_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ESPER_API_KEYS", "ESPER_API_KEYS_FILE", "ESPER_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = PlatformConfig(data_dir=tmp_path)
    auth, own, path = runtime_cli._platform_keys(cfg)
    assert path == tmp_path / "api-keys"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert own is not None and auth.keys[own] == frozenset({"*"})
    again = runtime_cli._platform_keys(cfg)
    assert again[1] == own  # reused, not regenerated


def test_up_with_configured_keys_adds_an_internal_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESPER_API_KEYS", "user-key-0123456789=urza:read")
    monkeypatch.delenv("ESPER_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("ESPER_API_KEY", raising=False)
    auth, own, path = runtime_cli._platform_keys(PlatformConfig(data_dir=tmp_path))
    assert path is None and own is not None and own != "user-key-0123456789"
    assert auth.keys["user-key-0123456789"] == frozenset({"urza:read"})
    assert auth.keys[own] == frozenset({"*"})
    assert not (tmp_path / "api-keys").exists()


def test_status_without_a_running_platform_fails(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_ENDPOINTS"}
    r = subprocess.run([sys.executable, "-m", "esper.cli", "status", "--data-dir", str(tmp_path)],
                       cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "endpoints.json" in r.stderr


def test_status_path_does_not_import_torch() -> None:
    code = "import sys, esper.cli; esper.cli.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"
