"""The broker's retained messages: a topic trie with limits.

Scanning every retained topic for every wildcard subscription would make a site with
years of retained job statuses pay for all of them on each SUBSCRIBE. Here retained messages hang in a trie keyed by topic level:
an exact filter is one walk down, ``+`` visits the children of one node, ``#`` the
subtree it names. A subscription costs what it can match, not what is stored.

The store is bounded (topics, bytes of topic + payload, trie nodes) so a
client publishing retained messages to ever new topics cannot exhaust the memory of
a small site box. A retained publish that would pass a limit is *refused*: the
message is still delivered to the current subscribers, but not kept; if it was
meant to replace a retained message, that stale one is cleared as well, so no one
is later told an old value as if it were the latest. Clearing a topic (an empty
retained payload) removes its node and every parent left empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

MAX_RETAINED_MESSAGES = 100_000
MAX_RETAINED_BYTES = 64 * 1024 * 1024
MAX_RETAINED_NODES = 500_000


class _Node(Generic[V]):
    __slots__ = ("children", "entry")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.entry: tuple[str, V, int] | None = None   # (topic, value, size in bytes)


class RetainedStore(Generic[V]):
    """topic → value, matched by MQTT filters; ``size`` of an entry = topic + payload bytes.

    Three limits, all checked before anything is stored: ``max_messages`` topics,
    ``max_bytes`` of topics and payloads, and ``max_nodes`` trie levels (a topic such as
    ``a/////…`` costs one node per level, far more than its bytes suggest).
    """

    def __init__(self, max_messages: int = MAX_RETAINED_MESSAGES, max_bytes: int = MAX_RETAINED_BYTES,
                 max_nodes: int = MAX_RETAINED_NODES):
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_nodes = max_nodes
        self._root: _Node[V] = _Node()
        self._count = 0
        self._bytes = 0
        self._nodes = 0

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def nodes(self) -> int:
        """Trie nodes below the root (what the index costs in memory)."""
        return self._nodes

    def get(self, topic: str) -> V | None:
        node, missing = self._descend(topic.split("/"))
        return node.entry[1] if missing == 0 and node.entry is not None else None

    def fits(self, topic: str, size: int) -> bool:
        """Would storing ``size`` bytes under ``topic`` stay within the limits?"""
        node, missing = self._descend(topic.split("/"))
        if missing == 0 and node.entry is not None:
            return self._bytes - node.entry[2] + size <= self.max_bytes
        return (self._count + 1 <= self.max_messages and self._bytes + size <= self.max_bytes
                and self._nodes + missing <= self.max_nodes)

    def put(self, topic: str, value: V, size: int, exempt: bool = False) -> bool:
        """Store or replace; False (and nothing stored) when it would pass a limit. ``exempt``
        (the gateway's own messages) is stored whatever the limits: clients cannot crowd it out."""
        if not exempt and not self.fits(topic, size):
            return False
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
                self._nodes += 1
            node = child
        if node.entry is None:
            self._count += 1
        else:
            self._bytes -= node.entry[2]
        node.entry = (topic, value, size)
        self._bytes += size
        return True

    def remove(self, topic: str) -> bool:
        """Forget ``topic``; empty nodes on its path are freed. True if it was stored."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.entry is None:
            return False
        self._bytes -= node.entry[2]
        self._count -= 1
        node.entry = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.entry is not None or child.children:
                break
            del parent.children[level]
            self._nodes -= 1
        return True

    def items(self) -> Iterator[tuple[str, V]]:
        for topic, value, _ in self._walk(self._root, skip_dollar=False):
            yield topic, value

    def match(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """Every stored topic the filter matches (MQTT 3.1.1 §4.7; '$' topics never match a
        leading wildcard [MQTT-4.7.2-1]). Iterative: a filter may have thousands of levels."""
        levels = topic_filter.split("/")
        last = len(levels)
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == last:
                if node.entry is not None:
                    yield node.entry[0], node.entry[1]
                continue
            level = levels[index]
            top = index == 0
            if level == "#":
                # "a/#" matches "a" too [MQTT-4.7.1-2]: node's own entry is part of the walk.
                for topic, value, _ in self._walk(node, skip_dollar=top):
                    yield topic, value
            elif level == "+":
                for name, child in node.children.items():
                    if not (top and name.startswith("$")):
                        stack.append((child, index + 1))
            else:
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, index + 1))

    # ------------------------------------------------------------------ internals
    def _descend(self, levels: list[str]) -> tuple[_Node[V], int]:
        """The deepest existing node on the path, and how many levels are missing below it."""
        node = self._root
        for depth, level in enumerate(levels):
            child = node.children.get(level)
            if child is None:
                return node, len(levels) - depth
            node = child
        return node, 0

    @staticmethod
    def _walk(node: _Node[V], skip_dollar: bool) -> Iterator[tuple[str, V, int]]:
        """Entries of ``node`` and below (iterative: topics may be deep)."""
        if node.entry is not None:
            yield node.entry
        stack = [child for name, child in node.children.items() if not (skip_dollar and name.startswith("$"))]
        while stack:
            current = stack.pop()
            if current.entry is not None:
                yield current.entry
            stack.extend(current.children.values())
