"""Topic names, topic filters and the subscription index of the embedded broker.

Matching every published topic against every filter (splitting strings per filter per
message) costs in proportion to the filters. Here exact filters are one dict lookup and wildcard
filters sit in a tree of levels, so routing costs one walk over the topic's levels
whatever the number of filters. Overlapping subscriptions of one client collapse into one delivery at
the highest granted QoS [MQTT-3.3.5-1].
"""

from __future__ import annotations

from typing import Generic, TypeVar

from gateway.topics import FilterTree

T = TypeVar("T")

MAX_TOPIC_BYTES = 65535


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: non-empty, no wildcards, no NUL [MQTT-4.7.3-1, MQTT-3.3.2-2, MQTT-4.7.3-2]."""
    return (bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic
            and len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES)


def valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: non-empty, '#' alone and last, '+' a whole level [MQTT-4.7.1-2/3]."""
    if not topic_filter or "\0" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def levels_match(filter_levels: list[str], topic_levels: list[str]) -> bool:
    """Plain level-wise MQTT matching (no '$' rule; callers apply it where it belongs)."""
    n_topic = len(topic_levels)
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if index >= n_topic:
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == n_topic


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7 matching; '$' topics never match a leading wildcard [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if not has_wildcard(topic_filter):
        return topic == topic_filter
    return levels_match(topic_filter.split("/"), topic.split("/"))


def covers(outer: list[str], inner: list[str]) -> bool:
    """True when every topic ``inner`` (a filter) can match is also matched by ``outer``.

    Used by ACLs: a client may subscribe to ``a/+/c`` only if a rule allows all of it,
    e.g. ``a/#``; ``+`` in the request is not covered by a literal level in the rule.
    """
    n_inner = len(inner)
    for index, level in enumerate(outer):
        if level == "#":
            return True
        if index >= n_inner:
            return False
        requested = inner[index]
        if requested == "#":
            return False
        if level == "+":
            continue
        if requested == "+" or requested != level:
            return False
    return len(outer) == n_inner


def _merge(out: dict[str, tuple[T, int]], subs: dict[str, tuple[T, int]]) -> None:
    if not out:
        out.update(subs)
        return
    for client_id, entry in subs.items():
        seen = out.get(client_id)
        # The entry's int is the granted QoS in its two low bits (gateway.broker.suboptions).
        if seen is None or (seen[1] & 3) < (entry[1] & 3):
            out[client_id] = entry


class SubscriptionIndex(Generic[T]):
    """filter → {client_id: (client, qos)}; ``match`` returns one entry per client.

    Exact filters are one dict lookup; wildcard filters sit in a tree of levels, so a
    topic is matched in one walk over its levels whatever the number of filters (the
    alarm engine subscribes the gateway to one filter per rule: with 100 rules a scan
    matched every telemetry message against 100 filters)."""

    __slots__ = ("_exact", "_tree", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, tuple[T, int]]] = {}
        self._wild: dict[str, dict[str, tuple[T, int]]] = {}   # wildcard filter → its subscribers
        self._tree: FilterTree[dict[str, tuple[T, int]]] = FilterTree()   # the same dicts by level

    def add(self, topic_filter: str, client_id: str, client: T, qos: int) -> None:
        if not has_wildcard(topic_filter):
            self._exact.setdefault(topic_filter, {})[client_id] = (client, qos)
            return
        subs = self._wild.get(topic_filter)
        if subs is None:
            subs = self._wild[topic_filter] = {}
            self._tree.set(topic_filter, subs)
        subs[client_id] = (client, qos)

    def remove(self, topic_filter: str, client_id: str) -> None:
        subs = (self._wild if has_wildcard(topic_filter) else self._exact).get(topic_filter)
        if subs is None:
            return
        subs.pop(client_id, None)
        if subs:
            return
        if has_wildcard(topic_filter):
            del self._wild[topic_filter]
            self._tree.discard(topic_filter)
        else:
            del self._exact[topic_filter]

    def match_filter(self, topic_filter: str, key: str) -> T | None:
        """The client (or group) stored under exactly ``topic_filter`` and ``key``."""
        subs = (self._wild if has_wildcard(topic_filter) else self._exact).get(topic_filter)
        entry = subs.get(key) if subs else None
        return entry[0] if entry is not None else None

    def match(self, topic: str) -> dict[str, tuple[T, int]]:
        """Every subscribed client whose filters match, with the maximum granted QoS."""
        out: dict[str, tuple[T, int]] = {}
        exact = self._exact.get(topic)
        if exact:
            out.update(exact)
        if self._wild:
            for subs in self._tree.matching(topic):
                _merge(out, subs)
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self._exact.values()) + sum(len(s) for s in self._wild.values())
