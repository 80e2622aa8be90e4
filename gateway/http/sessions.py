"""Login sessions of the operator page: a cookie, checked against the broker's accounts.

The API authenticates every request with HTTP Basic; a browser page needs a login form and
a logout, which Basic cannot give (a browser keeps Basic credentials until it is closed and
sends them to every request of the origin, cross-site ones included). So the page logs in
once with a form (the password is verified like a Basic one, :meth:`BasicAuth.check`) and
gets a session:

- The cookie ``homepot_session`` holds a random 256-bit token; only its SHA-256 is kept
  here, so the table of sessions holds nothing that logs in. It is ``HttpOnly`` (scripts
  cannot read it), ``SameSite=Strict`` (no other site's page or link makes the browser send
  it), ``Path=/``, and ``Secure`` when the API runs HTTPS.
- Each session has its own CSRF token, handed to the page's script by ``GET
  /ui/api/session`` (same-origin only: no CORS) and required on every state-changing
  request as ``X-CSRF-Token`` (compared in constant time), on top of SameSite and an
  ``Origin`` check. A forged cross-site request has the cookie withheld by SameSite, and
  could not send the header without a CORS preflight that the API never grants.
- A session ends after :data:`IDLE_S` without a request (an open page's event stream counts
  as use), after :data:`MAX_AGE_S` in any case, on logout, and as soon as its account is
  removed, changes role or changes password (the password file is looked at, at most once a
  second). Sessions live in memory: a daemon restart logs
  everyone out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway.broker.passwords import PasswordFile, PasswordFileError

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger(__name__)

COOKIE = "homepot_session"
IDLE_S = 3600.0  # an hour without a request
MAX_AGE_S = 12 * 3600.0  # a shift
MAX_SESSIONS = 1000  # beyond this the least recently used session ends
STAT_EVERY_S = 1.0


@dataclass(slots=True)
class Session:
    """One logged-in browser: who, which account version, and its CSRF token."""

    name: str
    role: str
    account: str  # SHA-256 of the account's stored hash at login: a new password ends the session
    csrf: str
    created: float
    seen: float
    streams: int = field(default=0)

    def expired(self, now: float) -> bool:
        return now - self.seen > IDLE_S or now - self.created > MAX_AGE_S


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def account_stamp(hash_: str) -> str:
    return hashlib.sha256(hash_.encode()).hexdigest()


class SessionStore:
    def __init__(self, password_file: Path, clock=time.monotonic):  # noqa: ANN001 - a callable returning seconds
        self.passwords = PasswordFile(password_file)
        self._sessions: dict[str, Session] = {}
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._stat_at = -STAT_EVERY_S

    def __len__(self) -> int:
        return len(self._sessions)

    async def create(self, name: str, role: str) -> tuple[str, Session] | None:
        """A new session for a verified account; None if the account vanished meanwhile."""
        accounts = await asyncio.to_thread(self._accounts)
        account = accounts.get(name) if accounts is not None else None
        if account is None or account.role != role:
            return None
        now = self._clock()
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].seen)
            del self._sessions[oldest]
        token = secrets.token_urlsafe(32)
        session = Session(name, role, account_stamp(account.hash), secrets.token_urlsafe(32), now, now)
        self._sessions[_digest(token)] = session
        return token, session

    async def get(self, token: str | None, touch: bool = True) -> Session | None:
        """The live session of a cookie value, or None (unknown, expired, account changed)."""
        if not token or len(token) > 128:
            return None
        await self._recheck_accounts()
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if session.expired(now):
            del self._sessions[key]
            log.info("operator session expired", user=session.name)
            return None
        if touch:
            session.seen = now
        return session

    def end(self, token: str | None) -> Session | None:
        if not token:
            return None
        return self._sessions.pop(_digest(token), None)

    def clear(self) -> None:
        self._sessions.clear()

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())

    # ------------------------------------------------------------------ account changes
    def _accounts(self) -> dict | None:  # noqa: ANN401 - name → Account; None when unreadable
        try:
            return dict(self.passwords.accounts())
        except (PasswordFileError, OSError) as exc:
            log.error("password file unreadable; operator sessions end", error=str(exc))
            return None

    async def _recheck_accounts(self) -> None:
        now = self._clock()
        if not self._sessions or now - self._stat_at < STAT_EVERY_S:
            return
        self._stat_at = now
        try:
            st = await asyncio.to_thread(os.stat, self.passwords.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        accounts = await asyncio.to_thread(self._accounts)
        for key, s in list(self._sessions.items()):
            account = accounts.get(s.name) if accounts is not None else None
            if account is None or account.role != s.role or account_stamp(account.hash) != s.account:
                del self._sessions[key]
                log.info("operator session ended: account changed", user=s.name)


def check_same_origin(request: "web.Request") -> None:
    """Refuse a state-changing request that says it comes from another site (``Sec-Fetch-Site``)
    or another origin (``Origin``): ApiError 403 ``csrf``. With the session's CSRF token and
    SameSite=Strict, the third of the page's defences against forged requests."""
    from gateway.http.errors import ApiError

    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise ApiError(403, "csrf", "Sec-Fetch-Site: a request from another site is refused")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, "csrf", f"Origin: {origin[:100]!r} is not this gateway's origin")


def cookie_header(token: str, secure: bool) -> str:
    """The Set-Cookie value of a new session (no Max-Age: it ends with the browser too)."""
    attrs = [f"{COOKIE}={token}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


def clear_cookie_header(secure: bool) -> str:
    attrs = [f"{COOKIE}=", "Path=/", "HttpOnly", "SameSite=Strict", "Max-Age=0"]
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


__all__ = ["COOKIE", "IDLE_S", "MAX_AGE_S", "Session", "SessionStore", "check_same_origin", "clear_cookie_header",
           "cookie_header"]
