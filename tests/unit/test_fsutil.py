"""esper.fsutil: the one atomic write (temp + fsync + rename + dir fsync) and pid check."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper import fsutil
from esper.fsutil import atomic_write, pid_alive


def test_writes_bytes_or_text_and_replaces_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    assert atomic_write(p, b"one") == p and p.read_bytes() == b"one"
    atomic_write(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]  # no temp file left


def test_mode_applies_to_the_new_file_and_mkdir_creates_parents(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "secret"
    with pytest.raises(FileNotFoundError):
        atomic_write(p, "x")
    atomic_write(p, "x", mode=0o600, mkdir=True)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_the_file_and_its_directory_are_fsynced_unless_not_durable(tmp_path: Path,
                                                                   monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write(tmp_path / "d", "x")
    assert len(synced) == 2  # the file, then its directory
    synced.clear()
    atomic_write(tmp_path / "d", "y", durable=False)
    assert synced == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "keep"
    p.write_text("old")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["keep"]


def test_pid_alive_knows_running_exited_and_zombie_processes() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    # Exited but not reaped: a zombie, which is not alive.
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
