"""MQTT topic names of the contract (§5) and filter matching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7 matching; '$' topics never match a leading wildcard [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("#", "+"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(t_levels) == len(f_levels)


class _FilterNode(Generic[V]):
    __slots__ = ("children", "end", "plus", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode[V]] = {}
        self.plus: _FilterNode[V] | None = None   # a filter has '+' at this level
        self.end: V | None = None                 # the value of the filter that ends here
        self.rest: V | None = None                # the value of the filter with '#' here

    def empty(self) -> bool:
        return not self.children and self.plus is None and self.end is None and self.rest is None


class FilterTree(Generic[V]):
    """Topic filters as a tree of levels, one value per filter: :meth:`matching` yields the
    value of every filter that matches a topic (as :func:`matches`) in one walk over the
    topic's levels, whatever the number of filters. The broker's subscriptions and the
    gateway client's routes both use it (the alarm engine adds a filter per rule)."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root: _FilterNode[V] = _FilterNode()

    def get(self, topic_filter: str) -> V | None:
        node: _FilterNode[V] | None = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                return node.rest
            node = node.plus if level == "+" else node.children.get(level)
            if node is None:
                return None
        return node.end

    def set(self, topic_filter: str, value: V) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                node.rest = value
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _FilterNode()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _FilterNode()
                node = child
        node.end = value

    def discard(self, topic_filter: str) -> None:
        """Forget the filter's value and the nodes no other filter needs."""
        path: list[tuple[_FilterNode[V], str]] = []   # (parent, level) down to the filter's node
        node: _FilterNode[V] | None = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                node.rest = None
                break
            nxt = node.plus if level == "+" else node.children.get(level)
            if nxt is None:
                return
            path.append((node, level))
            node = nxt
        else:
            node.end = None
        for parent, level in reversed(path):
            child = parent.plus if level == "+" else parent.children[level]
            if not child.empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]

    def matching(self, topic: str) -> Iterator[V]:
        levels = topic.split("/")
        n = len(levels)
        dollar = topic.startswith("$")   # never matched by a leading wildcard [MQTT-4.7.2-1]
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild = not (dollar and depth == 0)
            if node.rest is not None and wild:
                yield node.rest   # '#' also matches the parent level: "a/#" matches "a"
            if depth == n:
                if node.end is not None:
                    yield node.end
                continue
            child = node.children.get(levels[depth])
            if child is not None:
                stack.append((child, depth + 1))
            if node.plus is not None and wild:
                stack.append((node.plus, depth + 1))


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic and len(topic.encode()) <= 65535


@dataclass(frozen=True)
class Topics:
    """The topics of one site; ``prefix`` is ``<topic_prefix>/<site_id>`` (P)."""

    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}/jobs"

    def job_status(self, job_id: str) -> str:
        return f"{self.prefix}/jobs/{job_id}/status"

    def device_register(self, device_id: str = "+") -> str:
        return f"{self.prefix}/devices/{device_id}/register"

    def device_notify(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/notify"

    def device_ack(self, device_id: str = "+") -> str:
        return f"{self.prefix}/devices/{device_id}/ack"

    @property
    def gateway_status(self) -> str:
        return f"{self.prefix}/gateway/status"

    @property
    def gateway_errors(self) -> str:
        return f"{self.prefix}/gateway/errors"

    @property
    def acks(self) -> str:
        return f"{self.prefix}/acks"

    def device_id_of(self, topic: str) -> str | None:
        """``P/devices/<id>/...`` → ``<id>``."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        device_id, sep, _ = rest.partition("/")
        return device_id if sep else None
