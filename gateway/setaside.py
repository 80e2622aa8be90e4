"""Messages set aside: received, acknowledged, not processed, because handling them failed
for a reason that is not storage.

One bad message must never hold the MQTT link (every message after it would wait for it,
and the broker would redeliver it again and again). So a message whose handler raised
anything but a storage failure is acknowledged and set aside: counted, logged once (one
line with its topic, the reason and its first bytes; the traceback only for the first
message of each kind of failure, so a flood of one bad payload cannot flood the journal),
and kept in a small ring in memory, the last :data:`KEEP` of them, for ``status`` and
``/metrics``. The ring keeps topic, reason, time and size; the first bytes go to the log
only (the journal is private, the runtime snapshot that ``status`` reads is not).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from gateway.timeutil import iso, utcnow

KEEP = 50  # set-aside messages kept for status (the count covers all of them)
HEAD_BYTES = 64  # bytes of the payload that the log line shows
REASON_CHARS = 200
KINDS_TRACED = 256  # distinct kinds of failure whose first traceback is logged


@dataclass(frozen=True, slots=True)
class SetAsideMessage:
    topic: str
    reason: str  # "ExceptionType: message", cut to REASON_CHARS
    at: str  # when (UTC, ISO-8601)
    size: int  # payload bytes


class SetAside:
    """The count and the last :data:`KEEP` messages set aside by one MQTT link."""

    def __init__(self, logger: Any, link: str, keep: int = KEEP):
        self.log = logger
        self.link = link
        self.count = 0
        self._recent: deque[SetAsideMessage] = deque(maxlen=keep)
        self._traced: set[tuple[str, str]] = set()

    def add(self, topic: str, payload: bytes, exc: BaseException, route: str) -> SetAsideMessage:
        """Count, keep and log one set-aside message (call from the ``except`` block)."""
        reason = f"{exc.__class__.__name__}: {exc}"[:REASON_CHARS]
        entry = SetAsideMessage(topic, reason, iso(utcnow()), len(payload))
        self.count += 1
        self._recent.append(entry)
        kind = (route, exc.__class__.__name__)
        first = kind not in self._traced and len(self._traced) < KINDS_TRACED
        if first:
            self._traced.add(kind)
        self.log.error("message set aside: its handler failed; acknowledged, the messages after it flow",
                       link=self.link, topic=topic, reason=reason, size=len(payload),
                       head=_head(payload), exc_info=first)
        return entry

    def recent(self) -> list[dict[str, Any]]:
        """The kept messages, newest last, as plain dicts (for the runtime snapshot)."""
        return [asdict(m) for m in self._recent]


def _head(payload: bytes) -> str:
    """The first HEAD_BYTES bytes, printable ASCII kept and everything else escaped."""
    head = payload[:HEAD_BYTES].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in head)
    return text + ("..." if len(payload) > HEAD_BYTES else "")


__all__ = ["KEEP", "SetAside", "SetAsideMessage"]
