"""Credentials of the cloud bridges, in one place: cached access tokens and the
"re-authenticate once and resend" rule.

FCM (OAuth2 access token) and WNS (client-credentials token) cache a token until
``margin`` seconds before it expires, fetch it single-flight (one request however many
sends wait), and replace it when the platform rejects it. APNs signs its own JWTs
(:mod:`bridges.apns`), but follows the same resend rule. The rule: when the platform says
our credential is no longer good (FCM ``UNAUTHENTICATED``, APNs ``ExpiredProviderToken``,
WNS 401), get a different one and send once more; a second rejection is the answer. That
is re-authentication, not a retry, so it stays inside the bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bridges.base import Outcome

T = TypeVar("T")


class AuthFailed(Exception):
    """Getting a credential failed; ``outcome`` says whether that is configuration or transient."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Credential(Generic[T]):
    value: T
    fresh: bool = False  # obtained for this request rather than taken from the cache


class TokenCache:
    """One access token, reused until ``margin`` s before its expiry.

    ``fetch()`` returns ``(token, expires_at)`` or raises :class:`AuthFailed`; it runs at most
    once at a time. ``get(stale=t)`` never returns ``t`` again: it is how a sender whose
    token was just rejected asks for another one, while a sender that lost the race for the
    lock gets the token the winner fetched instead of fetching a second.
    """

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]], margin: float,
                 clock: Callable[[], float]):
        self._fetch = fetch
        self._margin = margin
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expiry = 0.0
        self.fetches = 0

    def _usable(self, stale: str | None) -> bool:
        return self._token is not None and self._token != stale and self._expiry - self._clock() > self._margin

    async def get(self, stale: str | None = None) -> Credential[str]:
        if self._usable(stale):
            assert self._token is not None
            return Credential(self._token)
        async with self._lock:
            if self._usable(stale):
                # Another sender fetched it while we waited: as fresh as one fetched here.
                assert self._token is not None
                return Credential(self._token, fresh=True)
            token, expiry = await self._fetch()
            self._token, self._expiry = token, expiry
            self.fetches += 1
            return Credential(token, fresh=True)

    @property
    def expiry(self) -> float:
        return self._expiry


Attempt = Callable[[Credential[T]], Awaitable[tuple[Outcome, bool]]]


async def send_with_reauth(credential: Callable[[T | None], Awaitable[Credential[T]]],
                           attempt: Attempt[T]) -> Outcome:
    """Send with a credential; if ``attempt`` reports it rejected, once more with a new one.

    ``credential(stale)`` returns a credential other than ``stale`` (None on the first
    round). ``attempt(credential)`` makes the request and returns ``(outcome,
    rejected)``; ``outcome`` is what the answer means when it is final, so a credential
    rejected twice yields the attempt's own verdict (unhealthy, for every bridge).
    """
    stale: T | None = None
    outcome: Outcome | None = None
    for round_ in (1, 2):
        try:
            cred = await credential(stale)
        except AuthFailed as exc:
            return exc.outcome
        outcome, rejected = await attempt(cred)
        if not rejected or round_ == 2:
            return outcome
        stale = cred.value
    assert outcome is not None
    return outcome


__all__ = ["AuthFailed", "Credential", "TokenCache", "send_with_reauth"]
