"""Shared subscriptions (MQTT 5.0 §4.8.2): ``$share/<group>/<filter>``.

Each message matching the filter goes to one member of the group, not to every member:
round robin over the members that are connected, and over every member (their sessions
queue it) when none is. When a member's connection ends, the QoS 1/2 messages it got through
the group and has not acknowledged are handed to another connected member (at least once: the
leaving member may have received one without acknowledging it); with no other member
connected they stay in its session until another member connects, which then takes them
(``GatewayBroker._collect_shared``; the group is stored with each queued message, so this
holds across a restart, when every connection ended with nothing handed over).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState


class SharedGroup:
    """The members of one ``$share/<group>/<filter>`` with their subscription options."""

    __slots__ = ("_next", "filter", "members", "name")

    @property
    def subscription(self) -> str:
        """``$share/<group>/<filter>``, as subscribed (and stored with a queued message)."""
        return f"$share/{self.name}/{self.filter}"

    def __init__(self, name: str, topic_filter: str):
        self.name = name
        self.filter = topic_filter
        self.members: dict[str, tuple[ClientState, int]] = {}
        self._next = 0

    def pick(self, topic: str, leaving: ClientState | None = None) -> tuple[ClientState, int] | None:
        """The member that gets the next message (None: no member may read ``topic``). With
        ``leaving`` (a member whose messages are handed over): another connected member only."""
        members = [m for m in self.members.values() if m[0] is not leaving]
        readable = [m for m in members if m[0].acl is None or m[0].acl.allow_all or m[0].acl.may_receive(topic)]
        online = [m for m in readable if m[0].handler is not None]
        if leaving is None and not online:
            online = readable
        if not online:
            return None
        self._next = (self._next + 1) % len(online)
        return online[self._next]
