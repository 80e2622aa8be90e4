"""The broker's account file: one ``NAME:HASH:ROLE`` line per user, argon2id hashes.

Written by ``homepot-gateway users add/remove`` while the daemon may be running; the
broker re-reads it when its mtime changes, so new accounts work without a restart.
Writes are atomic (temp file + rename) so a reader never sees half a file.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.ids import NOT_DOTS, is_id

NAME_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
ROLE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Account:
    name: str
    hash: str
    role: str


class PasswordFileError(ValueError):
    pass


def parse(text: str, path: Path | str = "passwd") -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # The argon2 hash contains '$' and ',' but never ':', nor does a role; a name may
        # (it allows ':'), so the line is split from the right.
        parts = line.rsplit(":", 2)
        if len(parts) != 3 or not NAME_RE.fullmatch(parts[0]) or not ROLE_RE.fullmatch(parts[2]):
            raise PasswordFileError(f"{path}:{lineno}: expected NAME:HASH:ROLE")
        accounts[parts[0]] = Account(parts[0], parts[1], parts[2])
    return accounts


class PasswordFile:
    """Cached view of the account file, reloaded when it changes on disk."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._accounts: dict[str, Account] = {}

    def stamp(self) -> tuple[int, int, int] | None:
        """What tells a changed file apart (writes replace it: a new inode); None if missing."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def accounts(self) -> dict[str, Account]:
        stamp = self.stamp()
        if stamp is None:
            self._stamp, self._accounts = None, {}
            return self._accounts
        if stamp != self._stamp:
            self._accounts = parse(self.path.read_text(encoding="utf-8"), self.path)
            self._stamp = stamp
        return self._accounts

    def reload(self) -> int:
        """Re-read the file now, even if its mtime and size look unchanged (SIGHUP); the number
        of accounts. A broken file raises :class:`PasswordFileError`."""
        return len(self.reload_accounts())

    def reload_accounts(self) -> dict[str, Account]:
        """:meth:`accounts`, read from the file now whatever its stamp says."""
        self._stamp = None
        return self.accounts()

    def current(self) -> dict[str, Account] | None:
        """The accounts as read, if the file has not changed since (a ``stat``, no read: cheap
        enough for the event loop); None when it has and must be read again (:meth:`accounts`)."""
        if self._stamp is None or self.stamp() != self._stamp:
            return None
        return self._accounts

    def verify(self, name: str, password: str) -> Account | None:
        """The account if ``password`` matches, else None (unknown user included)."""
        account = self.accounts().get(name)
        return account if check_password(account, password) and account is not None else None


def check_password(account: Account | None, password: str) -> bool:
    """A full argon2 check of ``password`` against the account's hash. An unknown account
    (None) costs the same time as a real check, so user names cannot be probed."""
    try:
        if account is None:
            _hasher.verify(_DUMMY_HASH, password)
            return False
        return bool(_hasher.verify(account.hash, password))
    except (VerificationError, InvalidHashError):
        return False


# A well-formed hash with the hasher's own cost parameters that no password matches: verifying
# against it costs what a real check costs. Written out rather than made with
# ``_hasher.hash()`` at import, which cost 0.3 s and a 64 MiB peak at every start.
_DUMMY_HASH = (f"$argon2id$v=19$m={_hasher.memory_cost},t={_hasher.time_cost},p={_hasher.parallelism}"
               f"${'A' * 22}${'A' * 43}")


def _write_atomic(path: Path, accounts: dict[str, Account]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for acc in accounts.values():
                fh.write(f"{acc.name}:{acc.hash}:{acc.role}\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_user(path: Path, name: str, password: str, role: str) -> None:
    if not is_id(NAME_RE, name):
        raise PasswordFileError(f"NAME: must match [A-Za-z0-9._:@-]{{1,128}} {NOT_DOTS}")
    if not ROLE_RE.fullmatch(role):
        raise PasswordFileError("--role: must match [A-Za-z0-9_-]{1,64}")
    if not password:
        raise PasswordFileError("password: must not be empty")
    accounts = parse(path.read_text(encoding="utf-8"), path) if path.exists() else {}
    old = accounts.get(name)
    # The same password keeps its hash: a connected client is logged out only when its
    # password really changed (a role change alone applies to it live, see accounts.py).
    hashed = old.hash if old is not None and _same_password(old.hash, password) else _hasher.hash(password)
    accounts[name] = Account(name, hashed, role)
    _write_atomic(path, accounts)


def _same_password(hashed: str, password: str) -> bool:
    try:
        return bool(_hasher.verify(hashed, password))
    except (VerificationError, InvalidHashError):
        return False


def remove_user(path: Path, name: str) -> bool:
    accounts = parse(path.read_text(encoding="utf-8"), path) if path.exists() else {}
    if accounts.pop(name, None) is None:
        return False
    _write_atomic(path, accounts)
    return True
