"""The daemon lock: ``data_dir/gateway.lock``, flock()ed exclusively while a daemon runs.

Two daemons on one database would both dispatch every job, so the second one refuses to
start. The CLI writes its work (jobs, devices) straight into SQLite and relies on a
running daemon to pick it up; it probes the same lock to tell the operator when nothing
will (``send`` while the daemon is down). An flock is released by the kernel when the
process dies, kill -9 included, so a stale lock file never blocks a restart; the file
itself stays and holds the last holder's pid for the messages.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "gateway.lock"


class AlreadyRunning(Exception):
    """Another process holds the lock; ``pid`` is what it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"gateway.data_dir: another homepot-gateway ({who}) runs on {path.parent} "
                         f"(it holds {path})")


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_NAME


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class DaemonLock:
    """Held by ``homepot-gateway run`` from start to exit."""

    def __init__(self, data_dir: Path):
        self.path = lock_path(data_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock


def daemon_pid(data_dir: Path) -> int | None:
    """The pid of the daemon running on ``data_dir``, 0 if its pid is unknown, None if none runs.

    Probes with a shared, non-blocking flock on a read-only descriptor: it fails only
    while a daemon holds its exclusive lock. Creates nothing.
    """
    path = lock_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = ["AlreadyRunning", "DaemonLock", "LOCK_NAME", "daemon_pid", "lock_path"]
