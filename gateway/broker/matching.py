"""Topic names, topic filters and the subscription index of the embedded broker.

amqtt matches every published topic against every subscription filter by splitting
strings per filter per message. Here exact filters are one dict lookup and wildcard
filters sit in a tree of levels, so routing costs one walk over the topic's levels
whatever the number of filters. Overlapping subscriptions of one client collapse into one delivery at
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


class _Node(Generic[T]):
    """One level of the wildcard filters' tree."""

    __slots__ = ("children", "end", "plus", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.plus: _Node[T] | None = None                 # '+' at this level
        self.end: dict[str, tuple[T, int]] | None = None   # filters that end here
        self.rest: dict[str, tuple[T, int]] | None = None  # filters with '#' here

    def empty(self) -> bool:
        return not self.children and self.plus is None and self.end is None and self.rest is None


def _merge(out: dict[str, tuple[T, int]], subs: dict[str, tuple[T, int]]) -> None:
    if not out:
        out.update(subs)
        return
    for client_id, entry in subs.items():
        seen = out.get(client_id)
        if seen is None or seen[1] < entry[1]:
            out[client_id] = entry


class SubscriptionIndex(Generic[T]):
    """filter → {client_id: (client, qos)}; ``match`` returns one entry per client.

    Exact filters are one dict lookup; wildcard filters sit in a tree of levels, so a
    topic is matched in one walk over its levels whatever the number of filters (the
    alarm engine subscribes the gateway to one filter per rule: with 100 rules a scan
    matched every telemetry message against 100 filters; bench/README.md, "Alarms")."""

    __slots__ = ("_exact", "_root", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, tuple[T, int]]] = {}
        self._wild: dict[str, dict[str, tuple[T, int]]] = {}   # wildcard filter → its subscribers
        self._root: _Node[T] = _Node()

    def add(self, topic_filter: str, client_id: str, client: T, qos: int) -> None:
        if not has_wildcard(topic_filter):
            self._exact.setdefault(topic_filter, {})[client_id] = (client, qos)
            return
        subs = self._wild.get(topic_filter)
        if subs is None:
            subs = self._wild[topic_filter] = {}
            node = self._root
            for level in topic_filter.split("/"):
                if level == "#":
                    node.rest = subs
                    break
                if level == "+":
                    if node.plus is None:
                        node.plus = _Node()
                    node = node.plus
                else:
                    child = node.children.get(level)
                    if child is None:
                        child = node.children[level] = _Node()
                    node = child
            else:
                node.end = subs
        subs[client_id] = (client, qos)

    def remove(self, topic_filter: str, client_id: str) -> None:
        if not has_wildcard(topic_filter):
            subs = self._exact.get(topic_filter)
            if subs is not None:
                subs.pop(client_id, None)
                if not subs:
                    del self._exact[topic_filter]
            return
        subs = self._wild.get(topic_filter)
        if subs is None:
            return
        subs.pop(client_id, None)
        if subs:
            return
        del self._wild[topic_filter]
        path: list[tuple[_Node[T], str]] = []   # (parent, level) down to the filter's node
        node = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                node.rest = None
                break
            nxt = node.plus if level == "+" else node.children.get(level)
            assert nxt is not None  # every wildcard filter in _wild has its path
            path.append((node, level))
            node = nxt
        else:
            node.end = None
        for parent, level in reversed(path):  # drop the nodes no filter needs any more
            child = parent.plus if level == "+" else parent.children[level]
            if not child.empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]

    def match(self, topic: str) -> dict[str, tuple[T, int]]:
        """Every subscribed client whose filters match, with the maximum granted QoS."""
        out: dict[str, tuple[T, int]] = {}
        exact = self._exact.get(topic)
        if exact:
            out.update(exact)
        if self._wild:
            levels = topic.split("/")
            n = len(levels)
            dollar = topic.startswith("$")
            stack = [(self._root, 0)]
            while stack:
                node, depth = stack.pop()
                wild = not (dollar and depth == 0)  # [MQTT-4.7.2-1]
                if node.rest is not None and wild:
                    _merge(out, node.rest)  # '#' also matches the parent level: "a/#" matches "a"
                if depth == n:
                    if node.end is not None:
                        _merge(out, node.end)
                    continue
                child = node.children.get(levels[depth])
                if child is not None:
                    stack.append((child, depth + 1))
                if node.plus is not None and wild:
                    stack.append((node.plus, depth + 1))
        return out

    def __len__(self) -> int:
        return sum(len(s) for s in self._exact.values()) + sum(len(s) for s in self._wild.values())
