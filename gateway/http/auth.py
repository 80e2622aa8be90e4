"""HTTP Basic against the broker's accounts, with the roles' MQTT meaning (contract §5, §10).

An account is the ``users add`` line ``NAME:HASH:ROLE`` (:mod:`gateway.broker.passwords`);
what a role may do over HTTP is what its ACL lets it do over MQTT: submit jobs = may
publish ``P/jobs``; read jobs = may subscribe ``P/jobs/+/status``; manage device X = may
publish ``P/devices/X/register`` (a ``device`` account: only its own id); list devices = its
publish filters cover every device's register topic.

argon2 is deliberately slow (~50 ms of CPU): the password checks are the broker's
(:class:`gateway.broker.logins.Logins`, an instance of its own here): a good password is
remembered as an HMAC under a per-process key while the account keeps the hash it matched,
one argon2 check runs at a time off the event loop, and an address whose checks keep failing
waits, then is answered 503 without a check. At most :data:`MAX_PENDING` checks wait at a
time; beyond that a request is answered 503 instead of queueing CPU work without bound.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.broker.acl import ClientAcl
from gateway.broker.logins import MAX_DELAY_S, Logins, Verdict
from gateway.broker.passwords import PasswordFile, PasswordFileError
from gateway.config import Config
from gateway.http.errors import ApiError
from gateway.topics import Topics

log = structlog.get_logger(__name__)

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
        self._logins = Logins(self.passwords)
        self._pending = 0

    def close(self) -> None:
        """Nothing to release: the checks run on the event loop's default executor."""

    def invalidate(self, cfg: Config | None = None) -> None:
        """Forget every remembered good password (SIGHUP, through the reload hooks of gateway.wiring)."""
        forgotten = self._logins.forget_all()
        if forgotten:
            log.info("http credential cache cleared", entries=forgotten)

    async def principal(self, header: str | None, source: str = "") -> Principal:
        """The request's principal, or ApiError 401/403/503. ``source``: the client's address
        (failed checks are counted per address)."""
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
        return await self.check(name, password, source)

    async def check(self, name: str, password: str, source: str = "") -> Principal:
        """The principal of a name and password (HTTP Basic, the operator page's login form),
        or ApiError 401/403/503; remembered and rate-bounded as described above."""
        if self._pending >= MAX_PENDING:
            raise ApiError(503, "not_ready", "too many logins being checked; try again", {"Retry-After": "1"})
        self._pending += 1
        try:
            verdict, account = await self._logins.verify(name, password, source)
        except (PasswordFileError, OSError) as exc:
            log.error("password file unreadable; HTTP logins refused", error=str(exc))
            verdict, account = Verdict.BAD, None
        finally:
            self._pending -= 1
        if verdict is Verdict.THROTTLED:
            raise ApiError(503, "not_ready", "too many failed logins from this address; try again later",
                           {"Retry-After": str(int(MAX_DELAY_S))})
        if account is None:
            raise ApiError(401, "unauthorized", "wrong user name or password", CHALLENGE)
        return self._principal(account.name, account.role)

    def principal_for(self, name: str, role: str) -> Principal:
        """The principal of an account already verified (an operator page session)."""
        return self._principal(name, role)

    def _principal(self, name: str, role: str) -> Principal:
        rule = self.roles.get(role)
        if rule is None:
            raise ApiError(403, "forbidden", f"role {role!r} of {name!r} is not defined in this configuration")
        return Principal(name, role, ClientAcl(rule, self.cfg.prefix, name), self.topics)


__all__ = ["BasicAuth", "Principal"]
