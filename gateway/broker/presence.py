"""Which device accounts are connected to the embedded broker, since when, last seen.

A PLC with no agent running looks like a slow PLC in every job; only the broker knows the
difference. A client that logged in with a ``device`` account (its username is its device
id) is tracked here as it attaches and detaches: ``since`` is when its current connection
began (the first of several, if the account has more than one), ``last_seen`` when it was
last connected (now while connected; when it left otherwise). Wall-clock times, because
they are shown to people; kept in memory only, so a restart forgets devices that have not
connected since (``last_seen`` unknown, shown as never seen since the gateway started).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway import clock
from gateway.timeutil import iso

DEVICE_ROLE = "device"


@dataclass
class _Seen:
    connections: int = 0
    since: float | None = None
    last_seen: float | None = None


class Presence:
    def __init__(self) -> None:
        self._by_device: dict[str, _Seen] = {}

    def attached(self, username: str | None, role: str | None) -> None:
        if not username or role != DEVICE_ROLE:
            return
        seen = self._by_device.setdefault(username, _Seen())
        now = clock.now()
        if seen.connections == 0:
            seen.since = now
        seen.connections += 1
        seen.last_seen = now

    def detached(self, username: str | None, role: str | None) -> None:
        seen = self._by_device.get(username or "")
        if seen is None or seen.connections == 0:
            return
        seen.connections -= 1
        seen.last_seen = clock.now()
        if seen.connections == 0:
            seen.since = seen.last_seen  # not connected since then

    def connected(self) -> list[str]:
        return sorted(d for d, s in self._by_device.items() if s.connections)

    def view(self) -> dict[str, dict[str, Any]]:
        """device_id → {"connected", "since", "last_seen"} (epoch seconds) for every device
        account seen since the broker started."""
        now = clock.now()
        return {d: {"connected": s.connections > 0, "since": s.since,
                    "last_seen": now if s.connections else s.last_seen}
                for d, s in self._by_device.items()}


def device_presence(view: dict[str, dict[str, Any]] | None, device_id: str) -> dict[str, Any]:
    """The Device view's ``presence``: a device never seen is not connected, times null."""
    seen = (view or {}).get(device_id)
    if seen is None:
        return {"connected": False, "since": None, "last_seen": None}
    return {"connected": bool(seen.get("connected")), "since": _iso(seen.get("since")),
            "last_seen": _iso(seen.get("last_seen"))}


def _iso(ts: Any) -> str | None:
    return iso(datetime.fromtimestamp(ts, UTC)) if isinstance(ts, (int, float)) else None


__all__ = ["DEVICE_ROLE", "Presence", "device_presence"]
