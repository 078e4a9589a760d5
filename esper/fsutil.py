"""Files and processes: the atomic write and the pid check every part uses.

`atomic_write(path, data)`: readers see the old file or the whole new one, never a part,
and after a crash the name holds one of the two: the bytes go to a temp file in the same
directory, are flushed and fsynced, renamed over `path`, and the directory is fsynced
(so the rename itself survives a power cut). Pure standard library: the library layer
(Kasmina's kernel cache, the growth export) uses it as much as the services do.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "pid_alive"]


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new names in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o666,
                 durable: bool = True, mkdir: bool = False) -> Path:
    """Replace `path` with `data` atomically; returns the path.

    Args:
        mode: permission bits of the new file (before the umask), e.g. 0o600 for a key or
            a password: it never exists with wider permissions, not even as the temp file.
        durable: fsync the file and its directory (False: atomic for readers, but a crash
            may lose the write; for status files that are rewritten often).
        mkdir: create missing parent directories first.

    Raises:
        OSError: the directory is missing (without `mkdir`), read-only, full, ... — the
            temp file is removed and `path` is left as it was.
    """
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    # Unique per process and thread: two writers of one name never share a temp file.
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(p.parent)
    return p


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) S ..."; comm may hold spaces, the state follows ")".
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: kill(0) is all we know
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
