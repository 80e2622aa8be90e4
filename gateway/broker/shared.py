"""Shared subscriptions (MQTT 5.0 §4.8.2): ``$share/<group>/<filter>``.

Each message matching the filter goes to one member of the group, not to every member:
round robin over the members that are connected, and over every member (their sessions
queue it) when none is. A member that leaves stops getting new messages at once; what is
already queued or in flight for it stays in its session (it gets it when it is back, or
it is dropped with the session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState


class SharedGroup:
    """The members of one ``$share/<group>/<filter>`` with their subscription options."""

    __slots__ = ("_next", "filter", "members", "name")

    def __init__(self, name: str, topic_filter: str):
        self.name = name
        self.filter = topic_filter
        self.members: dict[str, tuple[ClientState, int]] = {}
        self._next = 0

    def pick(self, topic: str) -> tuple[ClientState, int] | None:
        """The member that gets the next message (None: no member may read ``topic``)."""
        members = list(self.members.values())
        readable = [m for m in members if m[0].acl is None or m[0].acl.allow_all or m[0].acl.may_receive(topic)]
        online = [m for m in readable if m[0].handler is not None] or readable
        if not online:
            return None
        self._next = (self._next + 1) % len(online)
        return online[self._next]
