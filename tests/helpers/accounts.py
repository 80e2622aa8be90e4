"""Account files for tests, hashed cheaply.

The shipped hasher (``gateway.broker.passwords``, argon2id m=64 MiB, t=3, p=4) costs about
half a second of CPU per hash on a loaded test machine, and the daemon pays it again at
each account's first login. A test that only needs accounts writes the same
``NAME:HASH:ROLE`` file with argon2id at the smallest cost: the verifier takes the cost
parameters from each hash, so the daemon checks these exactly as it checks a
``users add`` line, only faster. A test of the hashing itself (its cost, the credential
cache that exists because of it) uses :func:`gateway.broker.passwords.add_user`.
"""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher

from gateway.broker.passwords import Account, _write_atomic, parse

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def write_accounts(path: Path, users: dict[str, tuple[str, str]]) -> Path:
    """``users`` (name → (role, password)) added to the account file at ``path``, each
    hashed at the cheapest argon2id cost, written by the same atomic, private (0600) writer
    as ``users add``."""
    accounts = parse(path.read_text(encoding="utf-8"), path) if path.exists() else {}
    for name, (role, password) in users.items():
        accounts[name] = Account(name, CHEAP.hash(password), role)
    _write_atomic(path, accounts)
    return path


__all__ = ["CHEAP", "write_accounts"]
