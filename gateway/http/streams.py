"""Open event streams, counted per account and in total.

Every server-sent-events stream (``/ui/api/events``, ``/v1/jobs/<id>/events``) holds a
connection and a waiting task for as long as the client keeps it. The gateway keeps at most
:data:`MAX_STREAMS` open, and one account — whether it logged in on the page or sends HTTP
Basic credentials — at most ``[http] max_streams_per_account``, so one account (a wall
display opening tab after tab, a script that never closes its streams) cannot take the
streams every other operator needs. The account's excess is answered 429 with a message
that names the cap; the gateway's own limit 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from gateway.http.errors import ApiError

log = structlog.get_logger(__name__)

MAX_STREAMS = 200
RETRY_AFTER_S = "5"


class StreamSlots:
    def __init__(self, per_account: int, total: int = MAX_STREAMS):
        self.per_account = per_account
        self.total = total
        self.open = 0
        self._by_account: dict[str, int] = {}
        self._refused_logged: set[str] = set()
        self.refused = 0

    def held(self, account: str) -> int:
        return self._by_account.get(account, 0)

    def _take(self, account: str) -> None:
        held = self._by_account.get(account, 0)
        if held >= self.per_account:
            self.refused += 1
            if account not in self._refused_logged:  # once per account until it is under the cap again
                self._refused_logged.add(account)
                log.info("event stream refused: account at its cap", account=account, cap=self.per_account)
            raise ApiError(429, "too_many_streams",
                           f"account {account!r} already has {held} open event streams, the most one account "
                           f"may hold ([http] max_streams_per_account = {self.per_account}); close a page or "
                           "stream", {"Retry-After": RETRY_AFTER_S})
        if self.open >= self.total:
            self.refused += 1
            raise ApiError(503, "not_ready", f"the gateway has {self.open} open event streams, its limit; "
                           "close a page", {"Retry-After": RETRY_AFTER_S})
        self._by_account[account] = held + 1
        self.open += 1

    def _give(self, account: str) -> None:
        self.open -= 1
        left = self._by_account[account] - 1
        if left:
            self._by_account[account] = left
        else:
            del self._by_account[account]
        self._refused_logged.discard(account)

    @contextmanager
    def hold(self, account: str) -> Iterator[None]:
        """One stream of ``account`` for the duration; raises :class:`ApiError` (429 over the
        account's cap, 503 over the total) before anything is sent."""
        self._take(account)
        try:
            yield
        finally:
            self._give(account)


__all__ = ["MAX_STREAMS", "StreamSlots"]
