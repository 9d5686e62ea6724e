"""The lock file that tells `restore` a service is using its data (`fcntl.flock`).

A running agent or coordinator holds a *shared* lock on its lock file for as long as it
runs (several may share a store, and the kernel drops the lock when the process dies, kill
-9 included); `restore` takes it *exclusively* and without waiting, so it is refused while
any of them runs, and a service that starts during a restore is refused in turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from dgdm.sync.errors import SyncError


class DataInUse(SyncError):
    """Another process holds the lock the other way (exit 1)."""


def hold_shared(path: Path, what: str) -> IO[bytes]:
    """For a service: the open lock file; keep it open while running. Refused while a
    restore holds it."""
    return _lock(
        path,
        fcntl.LOCK_SH,
        f"{path} is locked by a restore in progress: {what} starts once it has finished",
    )


def take_exclusive(path: Path, what: str) -> IO[bytes]:
    """For a restore: the open lock file, or `DataInUse` while a service holds it."""
    return _lock(
        path,
        fcntl.LOCK_EX,
        f"refusing to restore: a running {what} holds {path}; stop it first, then restore",
    )


def _lock(path: Path, how: int, refusal: str) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(handle.fileno(), how | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataInUse(refusal) from None
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        raise
    return handle


def beside(database: Path) -> Path:
    """The lock file of a SQLite database: `<name>.lock` next to it."""
    return database.with_name(database.name + ".lock")
