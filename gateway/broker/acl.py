"""Per-role topic ACLs (contract §5) compiled for one connected client.

A role is three filter lists: ``publish``, ``subscribe`` and ``deny``, with ``{prefix}``
(= ``<topic_prefix>/<site_id>``) and ``{username}`` substituted when the client
connects. Semantics:

- publish ``topic``: some ``publish`` filter matches it and no ``deny`` filter does;
- subscribe ``filter``: some ``subscribe`` filter covers *all* of it (``a/+`` is not
  covered by ``a/b``), and no ``deny`` filter covers it; a filter that merely
  overlaps a deny filter is granted, and the denied topics are filtered on delivery;
- receive ``topic`` (live or retained): some ``subscribe`` filter matches it and no
  ``deny`` filter does. This is what keeps retained messages of denied topics away.

A rule naming ``{username}`` is skipped for clients without a usable username
(anonymous ones), so it can never widen into a wildcard.
"""

from __future__ import annotations

from gateway.broker.matching import covers, levels_match
from gateway.config import AclRule

_CACHE_LIMIT = 4096


def _expand(filters: list[str], prefix: str, username: str | None) -> list[list[str]]:
    out: list[list[str]] = []
    usable = bool(username) and not any(c in username for c in "+#/\0")  # type: ignore[operator]
    for raw in filters:
        if "{username}" in raw:
            if not usable:
                continue
            raw = raw.replace("{username}", username or "")
        out.append(raw.replace("{prefix}", prefix).split("/"))
    return out


class ClientAcl:
    """The compiled ACL of one client; receive decisions are cached per topic."""

    __slots__ = ("_deny", "_publish", "_receive_cache", "_subscribe", "allow_all")

    def __init__(self, rule: AclRule, prefix: str, username: str | None):
        self._publish = _expand(rule.publish, prefix, username)
        self._subscribe = _expand(rule.subscribe, prefix, username)
        self._deny = _expand(rule.deny, prefix, username)
        # The admin case: nothing to check on the hot path.
        self.allow_all = not self._deny and ["#"] in self._publish and ["#"] in self._subscribe
        self._receive_cache: dict[str, bool] = {}

    @property
    def publish_filters(self) -> list[str]:
        """The publish filters after substitution (for log lines that explain a denial)."""
        return ["/".join(levels) for levels in self._publish]

    def _denied(self, levels: list[str]) -> bool:
        return any(levels_match(d, levels) for d in self._deny)

    def may_publish(self, topic: str) -> bool:
        if self.allow_all:
            return True
        levels = topic.split("/")
        return any(levels_match(p, levels) for p in self._publish) and not self._denied(levels)

    def may_subscribe(self, topic_filter: str) -> bool:
        if self.allow_all:
            return True
        levels = topic_filter.split("/")
        if any(covers(d, levels) for d in self._deny):
            return False
        return any(covers(s, levels) for s in self._subscribe)

    def may_receive(self, topic: str) -> bool:
        if self.allow_all:
            return True
        cached = self._receive_cache.get(topic)
        if cached is not None:
            return cached
        levels = topic.split("/")
        allowed = any(levels_match(s, levels) for s in self._subscribe) and not self._denied(levels)
        if len(self._receive_cache) >= _CACHE_LIMIT:
            self._receive_cache.clear()
        self._receive_cache[topic] = allowed
        return allowed
