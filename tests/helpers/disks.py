"""Small and full disks: a tmpfs of a given size, and filling one to ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str, mode: str = "0755") -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "16m") mounted on ``mnt`` (created), unmounted (lazily, so a
    daemon still holding files cannot block it) whatever the test did. Needs root: CI is."""
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(filler: Path) -> Path:
    """Write ``filler`` until its filesystem says ENOSPC, down to the last 512-byte block;
    deleting the file gives the space back."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 512):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler
