"""The CLI run as root against a service's data dir becomes the data dir's owner.

An operator types ``sudo homepot-gateway devices add …`` or ``users add …``; the service
runs as its own user (``homepot``). Files the CLI creates there — the SQLite ``-wal`` and
``-shm`` when the daemon is down, the password file, the VAPID key, the lock — must stay
writable and readable by that user, or the service breaks at its next start (a root-owned
0600 password file locks every device out). So, after reading the configuration (which
may need root: ``/etc`` and secret files), a root CLI drops *all* its ids to the owner of
``data_dir`` before it opens anything there, for good: nothing later needs root, and a
process that can switch back would be a weaker promise. A data dir owned by root (``make
run`` as root) or not yet created leaves the CLI as it is.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path


def become_owner_of(path: Path) -> str | None:
    """If running as root and ``path`` exists and belongs to another user, switch to that
    user and group (supplementary groups included); return the user name switched to."""
    if os.geteuid() != 0:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(st.st_uid)
        name = entry.pw_name
        os.initgroups(name, st.st_gid)
    except KeyError:  # a uid without a passwd entry (a dynamic user that is not running)
        name = str(st.st_uid)
        os.setgroups([st.st_gid])
    os.setresgid(st.st_gid, st.st_gid, st.st_gid)
    os.setresuid(st.st_uid, st.st_uid, st.st_uid)
    return name


__all__ = ["become_owner_of"]
