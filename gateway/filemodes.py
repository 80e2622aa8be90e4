"""The data dir is private: 0700, every file in it 0600, whatever the umask.

It holds notification text, signed ack URLs, push tokens, password hashes and keys. The
shipped unit sets ``UMask=0077`` and ``StateDirectoryMode=0700``, but ``make run``, a
container or another init system usually runs with umask 022, where SQLite would create
``gateway.db`` 0644 (and its ``-wal``/``-shm`` with the database's mode) in a 0755 dir.

So every entry point (the daemon and every CLI command) narrows its own umask to at most
077 before it creates anything: whatever the process creates afterwards — the database and
its journals, the lock, keys, secrets, runtime files — is owner-only without each writer
having to remember it. A data dir left loose by an older version, or by files copied in by
hand, is tightened once at start (group and other bits cleared; the owner's bits kept).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

PRIVATE_UMASK = 0o077
LOOSE_BITS = 0o077


def restrict_umask() -> int:
    """Add 077 to the process umask (never widening a stricter one); returns the new umask."""
    old = os.umask(PRIVATE_UMASK)
    new = old | PRIVATE_UMASK
    os.umask(new)
    return new


@dataclass
class Tightened:
    """What :func:`tighten` changed (paths with their old and new mode) and what it could not."""

    changed: list[tuple[str, int, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: str | None = None  # why the dir itself was left alone

    def summary(self, limit: int = 10) -> str:
        names = [f"{p} {oct(old)}->{oct(new)}" for p, old, new in self.changed[:limit]]
        more = f" and {len(self.changed) - limit} more" if len(self.changed) > limit else ""
        return ", ".join(names) + more


def tighten(data_dir: Path) -> Tightened:
    """Clear group and other bits on ``data_dir`` and everything below it (symlinks are not
    followed). A sticky, world-writable directory (``/tmp`` given as the data dir) is shared
    by design and is left alone. Entries another user owns cannot be changed unless we are
    root; they are reported, not fatal: the caller goes on and fails where access fails."""
    out = Tightened()
    try:
        top = data_dir.lstat()
    except FileNotFoundError:
        return out
    if stat.S_ISLNK(top.st_mode):
        try:
            top = data_dir.stat()
        except OSError:
            return out
    if not stat.S_ISDIR(top.st_mode):
        return out
    if top.st_mode & stat.S_ISVTX and top.st_mode & stat.S_IWOTH:
        out.skipped = f"{data_dir} is a shared sticky directory; give the gateway a directory of its own"
        return out
    _fix(data_dir, top.st_mode, ".", out)
    for root, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            path = Path(root) / name
            try:
                st = path.lstat()
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISLNK(st.st_mode):
                continue
            _fix(path, st.st_mode, str(path.relative_to(data_dir)), out)
    return out


def _fix(path: Path, mode: int, shown: str, out: Tightened) -> None:
    if not mode & LOOSE_BITS:
        return
    new = stat.S_IMODE(mode) & ~LOOSE_BITS
    try:
        os.chmod(path, new)  # not a symlink (the caller checked with lstat)
    except OSError as exc:
        out.failed.append((shown, exc.strerror or str(exc)))
        return
    out.changed.append((shown, stat.S_IMODE(mode), new))


def make_private(data_dir: Path) -> Tightened:
    """The daemon's start: narrow the umask, create ``data_dir`` (0700, and any missing
    parents likewise) or tighten the existing one."""
    restrict_umask()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tighten(data_dir)


__all__ = ["Tightened", "make_private", "restrict_umask", "tighten"]
