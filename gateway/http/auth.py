"""HTTP Basic against the broker's accounts, with the roles' MQTT meaning (contract §5, §10).

An account is the ``users add`` line ``NAME:HASH:ROLE`` (:mod:`gateway.broker.passwords`);
what a role may do over HTTP is what its ACL lets it do over MQTT: submit jobs = may
publish ``P/jobs``; read jobs = may subscribe ``P/jobs/+/status``; manage device X = may
publish ``P/devices/X/register`` (a ``device`` account: only its own id); list devices = its
publish filters cover every device's register topic.

argon2 is deliberately slow (~50 ms of CPU), so it runs on two worker threads of its own,
never on the event loop, and a verified (name, password) pair is remembered for
:data:`CACHE_TTL_S`. The cache is keyed by an HMAC of name and password under a per-process
random key: neither the password nor a plain hash of it is kept. It is forgotten when the
password file changes (checked at most once a second) and on :meth:`BasicAuth.invalidate`
(SIGHUP). At most :data:`MAX_PENDING` verifications wait at a time; beyond that a request
is answered 503 instead of queueing CPU work without bound (a password-guessing flood).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.broker.acl import ClientAcl
from gateway.broker.passwords import PasswordFile, PasswordFileError
from gateway.config import Config
from gateway.http.errors import ApiError
from gateway.topics import Topics

log = structlog.get_logger(__name__)

CACHE_TTL_S = 60.0
CACHE_MAX = 10_000
STAT_EVERY_S = 1.0
MAX_PENDING = 64
CHALLENGE = {"WWW-Authenticate": 'Basic realm="homepot-gateway", charset="UTF-8"'}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the account name, its role, and that role's compiled ACL."""

    name: str
    role: str
    acl: ClientAcl
    topics: Topics

    def may_submit_jobs(self) -> bool:
        return self.acl.may_publish(self.topics.jobs)

    def may_read_jobs(self) -> bool:
        return self.acl.may_subscribe(self.topics.job_status("+"))

    def may_manage_device(self, device_id: str) -> bool:
        return self.acl.may_publish(self.topics.device_register(device_id))

    def may_list_devices(self) -> bool:
        # A literal '+' level is matched only by a wildcard in the role's publish filters.
        return self.acl.may_publish(self.topics.device_register("+"))

    def may_manage_people(self) -> bool:
        """The person registry (contract §10: technician, controller, admin) is theirs who
        may register any device: a person is reached through devices."""
        return self.may_list_devices()


class BasicAuth:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.topics = Topics(cfg.prefix)
        self.roles = cfg.broker.roles()
        self.passwords = PasswordFile(Path(cfg.broker.auth.password_file))
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[str, str, float]] = {}  # hmac → (name, role, expires)
        self._stamp: tuple[int, int] | None = None
        self._stat_at = 0.0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
        self._pending = 0
        self.failures = 0
        self.verifications = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def invalidate(self, cfg: Config | None = None) -> None:
        """Forget every verified credential (SIGHUP, through the reload hooks of gateway.wiring; account changes)."""
        if self._cache:
            log.info("http credential cache cleared", entries=len(self._cache))
        self._cache.clear()

    def _check_file(self) -> None:
        now = time.monotonic()
        if now - self._stat_at < STAT_EVERY_S:
            return
        self._stat_at = now
        try:
            st = os.stat(self.passwords.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self.invalidate()

    async def principal(self, header: str | None) -> Principal:
        """The request's principal, or ApiError 401/403/503."""
        if not header:
            raise ApiError(401, "unauthorized", "credentials required (HTTP Basic, a `users add` account)", CHALLENGE)
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded.strip():
            raise ApiError(401, "unauthorized", "Authorization: only HTTP Basic is accepted", CHALLENGE)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError(401, "unauthorized", "Authorization: not valid base64 of NAME:PASSWORD", CHALLENGE) from None
        name, sep, password = decoded.partition(":")
        if not sep or not name:
            raise ApiError(401, "unauthorized", "Authorization: expected NAME:PASSWORD", CHALLENGE)
        return await self.check(name, password)

    async def check(self, name: str, password: str) -> Principal:
        """The principal of a name and password (HTTP Basic, the operator page's login form),
        or ApiError 401/403/503; cached and rate-bounded as described above."""
        self._check_file()
        key = hmac.new(self._key, name.encode() + b"\0" + password.encode(), hashlib.sha256).digest()
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[2] > now:
            return self._principal(cached[0], cached[1])
        if self._pending >= MAX_PENDING:
            raise ApiError(503, "not_ready", "too many logins being checked; try again", {"Retry-After": "1"})
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            account = await loop.run_in_executor(self._pool, self._verify, name, password)
        finally:
            self._pending -= 1
        if account is None:
            self.failures += 1
            raise ApiError(401, "unauthorized", "wrong user name or password", CHALLENGE)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (account.name, account.role, now + CACHE_TTL_S)
        return self._principal(account.name, account.role)

    def _verify(self, name: str, password: str):  # noqa: ANN202 - Account | None, on a worker thread
        self.verifications += 1
        try:
            return self.passwords.verify(name, password)
        except (PasswordFileError, OSError) as exc:
            log.error("password file unreadable; HTTP logins refused", error=str(exc))
            return None

    def principal_for(self, name: str, role: str) -> Principal:
        """The principal of an account already verified (an operator page session)."""
        return self._principal(name, role)

    def _principal(self, name: str, role: str) -> Principal:
        rule = self.roles.get(role)
        if rule is None:
            raise ApiError(403, "forbidden", f"role {role!r} of {name!r} is not defined in this configuration")
        return Principal(name, role, ClientAcl(rule, self.cfg.prefix, name), self.topics)


__all__ = ["BasicAuth", "Principal"]
