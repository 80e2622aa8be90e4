"""Topic names, topic filters and the subscription index of the embedded broker.

amqtt matches every published topic against every subscription filter by splitting
strings per filter per message. Here exact filters are one dict lookup and wildcard
filters are pre-split once, so routing cost grows with the number of wildcard
filters only. Overlapping subscriptions of one client collapse into one delivery at
the highest granted QoS [MQTT-3.3.5-1].
"""

from __future__ import annotations

from typing import Generic, TypeVar

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


class SubscriptionIndex(Generic[T]):
    """filter → {client_id: (client, qos)}; ``match`` returns one entry per client."""

    __slots__ = ("_exact", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, tuple[T, int]]] = {}
        self._wild: dict[str, tuple[list[str], bool, dict[str, tuple[T, int]]]] = {}

    def add(self, topic_filter: str, client_id: str, client: T, qos: int) -> None:
        if has_wildcard(topic_filter):
            entry = self._wild.get(topic_filter)
            if entry is None:
                levels = topic_filter.split("/")
                entry = (levels, levels[0] in ("+", "#"), {})
                self._wild[topic_filter] = entry
            entry[2][client_id] = (client, qos)
        else:
            self._exact.setdefault(topic_filter, {})[client_id] = (client, qos)

    def remove(self, topic_filter: str, client_id: str) -> None:
        if has_wildcard(topic_filter):
            entry = self._wild.get(topic_filter)
            if entry is not None:
                entry[2].pop(client_id, None)
                if not entry[2]:
                    del self._wild[topic_filter]
        else:
            subs = self._exact.get(topic_filter)
            if subs is not None:
                subs.pop(client_id, None)
                if not subs:
                    del self._exact[topic_filter]

    def match(self, topic: str) -> dict[str, tuple[T, int]]:
        """Every subscribed client whose filters match, with the maximum granted QoS."""
        out: dict[str, tuple[T, int]] = {}
        exact = self._exact.get(topic)
        if exact:
            out.update(exact)
        if self._wild:
            dollar = topic.startswith("$")
            levels = topic.split("/")
            for filter_levels, leading_wildcard, subs in self._wild.values():
                if dollar and leading_wildcard:
                    continue  # [MQTT-4.7.2-1]
                if not levels_match(filter_levels, levels):
                    continue
                if not out:
                    out.update(subs)
                    continue
                for client_id, entry in subs.items():
                    seen = out.get(client_id)
                    if seen is None or seen[1] < entry[1]:
                        out[client_id] = entry
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self._exact.values()) + sum(len(e[2]) for e in self._wild.values())
