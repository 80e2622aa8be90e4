"""Password checks of the embedded broker and the HTTP API: argon2 once per good password, never both cores for guesses.

Every CONNECT with a user name was a full argon2 check in a thread: tens of milliseconds of
CPU by design, spread over several threads. A client that reconnects in a loop (one
disconnected for an oversized packet, a device in a crash loop, a hostile one) so took the 2
cores from every other client: a legitimate QoS 1 publisher fell to 0.52x of its rate beside
one (bench/hostile_bench.py). So:

- **a good password is remembered**, per account, as an HMAC-SHA256 of it under a random
  key made at start (never the password itself), with the account's argon2 hash it matched.
  The same password again is compared in constant time and skips argon2. An entry counts
  only while the account in the password file still has that hash (the file's stamp is
  looked at on every login, as before), so a changed or removed password is refused at once;
  :meth:`Logins.forget_changed` (called where the broker applies a changed file to connected
  clients, accounts.py) drops entries of changed accounts so no old verifier stays in memory.
  The trade-off (docs/broker.md): a memory dump of the running daemon yields the key and a
  fast-hash verifier of each password that logged in since the start (only of those);
- **one argon2 check at a time** (a semaphore): unknown names, wrong passwords and first
  logins queue for one core instead of taking both;
- **an account that keeps getting itself disconnected waits**: a client closed for a protocol
  violation or a packet over its ``max_packet_size`` that reconnects in a loop cost a
  connection's work each time (and, in the hostile bench, its own CPU beside the broker's);
  the same progressive wait as for failed checks applies to the account's next CONNECTs,
  password known or not (anonymous clients are not counted: many may share an address);
- **a source address that keeps failing waits**: after :data:`FREE_FAILURES` failed checks
  in a row, each further check from the address waits its turn, the spacing doubling from
  :data:`BASE_DELAY_S` up to :data:`MAX_DELAY_S`; a check whose turn is further away than
  that is refused at once (CONNACK "server busy") without hashing. A success from the address,
  or :data:`FORGET_S` without a failure, clears it; at most :data:`MAX_SOURCES` addresses are
  remembered (the least recently failing is forgotten first). A known good password (above)
  never waits: a client that knows its password is not held up by a neighbour behind the same
  address guessing.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hashlib import sha256

from gateway.broker.passwords import Account, PasswordFile, check_password

FREE_FAILURES = 3         # failed checks in a row from one address before it waits
BASE_DELAY_S = 0.5        # the first wait; doubled at each further failure
MAX_DELAY_S = 8.0         # the longest spacing; a turn further away than this is refused
FORGET_S = 600.0          # an address that has not failed for this long starts afresh
MAX_SOURCES = 4096        # addresses remembered (about 100 bytes each)


class Verdict(enum.Enum):
    """The outcome of one login."""

    GOOD = "good"
    BAD = "bad"             # unknown name or wrong password
    THROTTLED = "throttled"  # the address failed too often: refused without a check


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0       # monotonic time of the last failure
    next_at: float = 0.0    # the earliest a check from this address may start


class Logins:
    """Checks user name and password against the password file (see the module docstring)."""

    def __init__(self, passwords: PasswordFile, clock: Callable[[], float] = time.monotonic):
        self._passwords = passwords
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._good: dict[str, tuple[str, bytes]] = {}   # name -> (argon2 hash matched, HMAC of the password)
        self._hashing = asyncio.Semaphore(1)
        self._failures = Backoff(clock)      # failed checks per source address
        self._violations = Backoff(clock)    # disconnections for a protocol violation or limit, per principal

    async def verify(self, name: str, password: str, source: str) -> tuple[Verdict, Account | None]:
        """The verdict and, when GOOD, the account. :class:`PasswordFileError` if the file is broken."""
        accounts = self._passwords.current()
        if accounts is None:   # changed on disk since it was read: read it off the event loop
            accounts = await asyncio.to_thread(self._passwords.accounts)
        account = accounts.get(name)
        digest = self._digest(name, password)
        if account is not None:
            known = self._good.get(name)
            if known is not None and known[0] == account.hash and hmac.compare_digest(known[1], digest):
                return Verdict.GOOD, account
        wait = self._failures.turn(source)
        if wait is None:
            return Verdict.THROTTLED, None
        if wait > 0:
            await asyncio.sleep(wait)
        async with self._hashing:
            # argon2 takes tens of milliseconds of CPU: never on the event loop.
            ok = await asyncio.to_thread(check_password, account, password)
        if not ok or account is None:
            self._failures.event(source)
            return Verdict.BAD, None
        self._failures.clear(source)
        self._good[name] = (account.hash, digest)
        return Verdict.GOOD, account

    def forget_changed(self, accounts: Mapping[str, Account]) -> None:
        """The password file changed: drop what was remembered of accounts that are gone or have
        another hash now (their remembered password is not theirs any more)."""
        for name, (hashed, _) in list(self._good.items()):
            account = accounts.get(name)
            if account is None or account.hash != hashed:
                del self._good[name]

    async def admit(self, principal: str) -> bool:
        """A client of ``principal`` (an account) disconnected for breaking the protocol or a limit
        (:meth:`violated`) :data:`FREE_FAILURES` times, each within :data:`FORGET_S` of the last,
        waits before its next CONNECT goes on, as a failing address does; False: refused now
        (its turn is too far). Only time clears it: a clean connection in between would let a
        client reset its count for the price of one more connection."""
        wait = self._violations.turn(principal)
        if wait is None:
            return False
        if wait > 0:
            await asyncio.sleep(wait)
        return True

    def violated(self, principal: str) -> None:
        """A connection of ``principal`` was closed for a protocol violation or a packet over its
        limit. A client that does that in a loop (reconnect, send it again) cost the broker a
        connection's work each time and kept the host busy: it is slowed down (:meth:`admit`)."""
        self._violations.event(principal)

    def forget_all(self) -> int:
        """Drop every remembered good password (a reload that re-reads everything); how many."""
        count = len(self._good)
        self._good.clear()
        return count

    def remembered(self) -> int:
        """Accounts whose good password is remembered."""
        return len(self._good)

    def _digest(self, name: str, password: str) -> bytes:
        data = name.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, sha256).digest()



class Backoff:
    """Events (failed checks, violations) per key, and the wait they earn: after
    :data:`FREE_FAILURES` in a row, each further attempt of the key waits its turn, the spacing
    doubling from :data:`BASE_DELAY_S` up to :data:`MAX_DELAY_S`; an attempt whose turn is
    further away than that is refused. :data:`FORGET_S` without an event, or :meth:`clear`,
    starts the key afresh; at most ``max_keys`` keys (the least recent forgotten first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_SOURCES):
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def turn(self, key: str) -> float | None:
        """Seconds to wait before the attempt of ``key`` goes on; None: refuse it now."""
        entry = self._keys.get(key)
        if entry is None or entry.count < FREE_FAILURES:
            return 0.0
        now = self._clock()
        if now - entry.last >= FORGET_S:
            del self._keys[key]
            return 0.0
        start = max(now, entry.next_at)
        if start - now > MAX_DELAY_S:
            return None
        entry.next_at = start + _spacing(entry.count)   # parallel attempts queue behind each other
        return start - now

    def event(self, key: str) -> None:
        now = self._clock()
        entry = self._keys.pop(key, None)
        if entry is None:
            entry = _Failures()
            if len(self._keys) >= self._max_keys:
                self._keys.popitem(last=False)
        elif now - entry.last >= FORGET_S:
            entry = _Failures()
        entry.count += 1
        entry.last = now
        if entry.count >= FREE_FAILURES:
            entry.next_at = max(entry.next_at, now + _spacing(entry.count))
        self._keys[key] = entry   # most recent last

    def clear(self, key: str) -> None:
        self._keys.pop(key, None)


def _spacing(count: int) -> float:
    return min(MAX_DELAY_S, BASE_DELAY_S * 2.0 ** (count - FREE_FAILURES))


def source_of(remote: str) -> str:
    """The address part of ``host:port`` (IPv6 too: the port is after the last colon)."""
    host, sep, _ = remote.rpartition(":")
    return host if sep else remote
