"""What one client may cost the embedded broker (``[broker.limits]``, contract §4).

Without limits one client could sink the site: a 255 MiB PUBLISH was buffered whole
before anyone looked at it, one retained message could fill the site-wide retained
store, and persistent sessions left behind by a monitor multiplied every QoS 1 write.
This module owns the decisions; the broker calls it from a few small hooks (the
reader's fixed header, CONNECT, session creation, queueing, retained, the publish
rate), so the hooks can move with the wire code.

- :class:`LimitPolicy` resolves ``[broker.limits]`` and ``[broker.limits.<role>]`` into
  one :class:`ClientLimits` per role. The gateway's own client is never limited; the
  ``admin`` role only by the keys a ``[broker.limits.admin]`` table names; roles
  ``device`` and ``anonymous`` get a small ``max_packet_size`` and a ``max_publish_rate``
  unless their role table sets them.
- :class:`Limit` names each limit (metric ``limited_<name>``, log field ``limit``);
  :class:`LimitVerdict` is the MQTT 5 reason code a limit maps to. The 3.1.1 answer
  has no reason code: a refused CONNECT gets CONNACK 0x03, a too-large packet closes
  the connection, queued messages are dropped oldest first, a retained message over
  quota is delivered but not kept, a client over its rate is read more slowly.
- :class:`LimitRecorder` counts every hit and logs it once per client and limit per
  minute (with the number held back).
- :class:`RetainedQuota` accounts retained topics and bytes per principal.
- :class:`RateBucket` is the per-connection token bucket for messages and bytes.
- :class:`ConnectionCount` counts connected clients per role as they attach and detach.

Where the broker calls in (each a few lines, to move with the wire code):

- reader, after the fixed header: ``length > client.limits.max_packet_size`` →
  ``GatewayBroker.packet_too_large`` and close; after a PUBLISH: ``client.rate.take(length)``
  → ``GatewayBroker.rate_pause``;
- accept, before CONNECT: the count of sockets still connecting, and ``_connect_length``
  (``MAX_CONNECT_PACKET``);
- after authentication: ``GatewayBroker._quota_refusal`` → a :class:`Limit` (CONNACK 0x03;
  MQTT 5: ``limit.verdict``), which may also evict the principal's longest-offline session;
- ``ClientState.enqueue``: ``max_queued_bytes``; ``GatewayBroker.route``: the retained quota
  (``GatewayBroker.retained_verdict`` for a PUBACK reason code);
- ``EmbeddedBroker``: the session expiry sweep and :class:`gateway.broker.accounts.AccountWatcher`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import structlog

from gateway.broker.throttle import LogThrottle
from gateway.config import MQTT_MAX_PACKET, BrokerLimits

if TYPE_CHECKING:
    from gateway.broker.metrics import BrokerMetrics

log = structlog.get_logger(__name__)

SMALL_PACKET = 65_536            # max_packet_size default of roles device and anonymous
SMALL_PACKET_ROLES = ("device", "anonymous")
# max_publish_rate default of the same roles: a device publishes telemetry, registrations and
# acks, far below this; unlimited, one device flooding denied PUBLISHes took the broker's event
# loop from everyone (bench/hostile_bench.py: a technician's QoS 1 rate fell to 0.08-0.34x).
SMALL_PUBLISH_RATE = 1000.0
# The shortest pause of a client over its rate. Paused only until its debt was paid, a flooder
# at 1000 messages/s was paused (a timer and a wake-up of its reader) once per message; paused
# at least this long, it is read in bursts of what the pause refilled, ~20 pauses a second.
MIN_PAUSE_S = 0.05
MAX_CONNECT_PACKET = 65_536      # a CONNECT is read before its sender is known: bounded for everyone
SERVER_UNAVAILABLE = 0x03        # MQTT 3.1.1 CONNACK return code for a refused-by-quota CONNECT


class LimitVerdict(enum.IntEnum):
    """The MQTT 5 reason code a limit is answered with (the v5 wire maps it; 3.1.1 has none)."""

    PACKET_TOO_LARGE = 0x95
    RATE = 0x96              # Message rate too high
    QUOTA_EXCEEDED = 0x97

    @property
    def v5_reason(self) -> int:
        return int(self)


class Limit(enum.Enum):
    """One limit; the value is its metric suffix (``limited_<value>``)."""

    PACKET_SIZE = "packet_size"
    CONNECTIONS = "connections"
    SESSIONS = "sessions"
    QUEUED_BYTES = "queued_bytes"
    RETAINED = "retained"
    RATE = "rate"

    @property
    def verdict(self) -> LimitVerdict:
        if self is Limit.PACKET_SIZE:
            return LimitVerdict.PACKET_TOO_LARGE
        if self is Limit.RATE:
            return LimitVerdict.RATE
        return LimitVerdict.QUOTA_EXCEEDED

    @property
    def metric(self) -> str:
        return f"limited_{self.value}"


# What each limit does to a 3.1.1 client (the log line says it, the README documents it).
_ANSWER_311 = {
    Limit.PACKET_SIZE: "connection closed after the fixed header (body not read)",
    Limit.CONNECTIONS: "CONNACK 0x03 (server unavailable)",
    Limit.SESSIONS: "CONNACK 0x03 (server unavailable): every session of the principal is connected",
    Limit.QUEUED_BYTES: "oldest queued message dropped",
    Limit.RETAINED: "delivered to current subscribers, not kept as retained",
    Limit.RATE: "connection read more slowly until the client is within its rate",
}


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """The limits of one client; 0 means no limit (``max_packet_size``: MQTT's own maximum)."""

    max_packet_size: int = MQTT_MAX_PACKET
    max_connections: int = 0
    max_sessions_per_account: int = 0
    session_expiry_s: float = 0.0
    max_queued_bytes: int = 0
    max_retained_per_principal: int = 0
    max_retained_bytes_per_principal: int = 0
    max_keepalive: int = 0
    max_publish_rate: float = 0.0
    max_publish_bytes_rate: float = 0.0

    @property
    def rate_limited(self) -> bool:
        return bool(self.max_publish_rate or self.max_publish_bytes_rate)


UNLIMITED = ClientLimits()
_KEYS = tuple(f.name for f in fields(ClientLimits))


class LimitPolicy:
    """``[broker.limits]`` resolved per role (cached: roles are few)."""

    def __init__(self, cfg: BrokerLimits | None = None):
        self.cfg = cfg or BrokerLimits()
        self._cache: dict[str, ClientLimits] = {}
        base = {key: getattr(self.cfg, key) for key in _KEYS}
        self.max_connections = self.cfg.max_connections
        self._base = ClientLimits(**base)

    def for_role(self, role: str | None, gateway: bool = False) -> ClientLimits:
        """The limits of a client of ``role``; the gateway's own client has none."""
        if gateway:
            return UNLIMITED
        role = role or ""
        cached = self._cache.get(role)
        if cached is not None:
            return cached
        table = self.cfg.roles.get(role)
        given = {k: v for k, v in (table.model_dump() if table is not None else {}).items() if v is not None}
        if role == "admin":
            # Not limited unless [broker.limits.admin] says so, and then only by what it names.
            limits = replace(UNLIMITED, **given)
        else:
            limits = self._base
            if role in SMALL_PACKET_ROLES:
                rate = limits.max_publish_rate
                limits = replace(limits, max_packet_size=min(SMALL_PACKET, limits.max_packet_size),
                                 max_publish_rate=min(rate, SMALL_PUBLISH_RATE) if rate else SMALL_PUBLISH_RATE)
            limits = replace(limits, **given)
        self._cache[role] = limits
        return limits

    def shortest_expiry(self, roles: list[str]) -> float:
        """The shortest non-zero session expiry of any role (0: sessions never expire)."""
        expiries = [self.for_role(r).session_expiry_s for r in roles]
        expiries = [e for e in expiries if e > 0]
        return min(expiries) if expiries else 0.0


class LimitRecorder:
    """Counts a limit hit in the broker's metrics and logs it once per client and limit a minute."""

    def __init__(self, metrics: BrokerMetrics, throttle: LogThrottle | None = None):
        self.metrics = metrics
        self._log = throttle or LogThrottle()

    def hit(self, limit: Limit, client_id: str | None, count: int = 1, **fields: Any) -> LimitVerdict:
        setattr(self.metrics, limit.metric, getattr(self.metrics, limit.metric) + count)
        suppressed = self._log((client_id, limit))
        if suppressed is not None:
            log.warning("client hit a broker limit", limit=limit.value, client_id=client_id,
                        mqtt311=_ANSWER_311[limit], mqtt5_reason=hex(limit.verdict.v5_reason),
                        suppressed_since_last=suppressed, **fields)
        return limit.verdict


class RetainedQuota:
    """Retained topics and bytes per principal: who owns each retained topic, and totals.

    The owner of a retained topic is the principal that last set it; replacing another
    principal's topic moves it to the new owner. Topics owned by ``None`` (the gateway's own
    client, and topics stored before owners were recorded) count against no one."""

    def __init__(self) -> None:
        self._owner: dict[str, tuple[str, int]] = {}          # topic -> (principal, size)
        self._totals: dict[str, list[int]] = {}              # principal -> [topics, bytes]

    def usage(self, principal: str) -> tuple[int, int]:
        total = self._totals.get(principal)
        return (total[0], total[1]) if total else (0, 0)

    def admits(self, topic: str, principal: str | None, size: int, limits: ClientLimits) -> bool:
        """Would ``principal`` stay within its quota after setting ``topic`` to ``size`` bytes?"""
        if principal is None:
            return True
        count, nbytes = self.usage(principal)
        held = self._owner.get(topic)
        if held is not None and held[0] == principal:
            nbytes -= held[1]
        else:
            count += 1
        if limits.max_retained_per_principal and count > limits.max_retained_per_principal:
            return False
        return not (limits.max_retained_bytes_per_principal and nbytes + size > limits.max_retained_bytes_per_principal)

    def stored(self, topic: str, principal: str | None, size: int) -> None:
        self.removed(topic)
        if principal is None:
            return
        self._owner[topic] = (principal, size)
        total = self._totals.setdefault(principal, [0, 0])
        total[0] += 1
        total[1] += size

    def removed(self, topic: str) -> None:
        held = self._owner.pop(topic, None)
        if held is None:
            return
        total = self._totals[held[0]]
        total[0] -= 1
        total[1] -= held[1]
        if total[0] <= 0:
            del self._totals[held[0]]

    def owner(self, topic: str) -> str | None:
        held = self._owner.get(topic)
        return held[0] if held else None


class ConnectionCount:
    """Connected clients that ``max_connections`` counts (those with a limit), in total and per
    role: kept as clients attach and detach, so a CONNECT costs no walk over every client."""

    __slots__ = ("by_role", "total")

    def __init__(self) -> None:
        self.total = 0
        self.by_role: dict[str | None, int] = {}

    def add(self, role: str | None, limits: ClientLimits) -> tuple[str | None, bool]:
        """Count a client now connected; returns the key :meth:`remove` takes back."""
        counted = bool(limits.max_connections)
        if counted:
            self.total += 1
            self.by_role[role] = self.by_role.get(role, 0) + 1
        return role, counted

    def remove(self, key: tuple[str | None, bool]) -> None:
        role, counted = key
        if counted:
            self.total -= 1
            self.by_role[role] -= 1


class RateBucket:
    """Token buckets for one connection's PUBLISH messages and payload bytes.

    Each holds one second's worth (a burst of a second is allowed). :meth:`take` charges one
    message of ``nbytes`` and returns how long the reader should wait before reading the next
    packet (0: within the rate; else at least ``MIN_PAUSE_S``). A message larger than a second's
    bytes leaves a debt that the wait pays off. Monotonic clock."""

    __slots__ = ("_bytes", "_clock", "_last", "_msgs", "byte_rate", "msg_rate")

    def __init__(self, msg_rate: float, byte_rate: float, clock: Any = time.monotonic):
        self.msg_rate = msg_rate
        self.byte_rate = byte_rate
        self._clock = clock
        self._msgs = msg_rate
        self._bytes = byte_rate
        self._last = clock()

    def take(self, nbytes: int) -> float:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        wait = 0.0
        if self.msg_rate:
            self._msgs = min(self.msg_rate, self._msgs + elapsed * self.msg_rate) - 1
            if self._msgs < 0:
                wait = -self._msgs / self.msg_rate
        if self.byte_rate:
            self._bytes = min(self.byte_rate, self._bytes + elapsed * self.byte_rate) - nbytes
            if self._bytes < 0:
                wait = max(wait, -self._bytes / self.byte_rate)
        return max(wait, MIN_PAUSE_S) if wait else 0.0
