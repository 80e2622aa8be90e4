"""The one small interface every bridge implements.

A bridge turns one :class:`Delivery` into one request to its platform and maps the
answer to an :class:`Outcome`. It never retries, sleeps, falls back or persists:
those policies live once, in the pipeline (``gateway.pipeline``). Like an httpx
transport, a bridge is created from config, ``start``ed once, asked to ``send``
many times concurrently, and ``close``d.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from devices.models import Channel

if TYPE_CHECKING:
    from gateway.mqtt import GatewayClient
    from gateway.topics import Topics


@dataclass(frozen=True, slots=True)
class Notification:
    """What the job asks to show; ``data`` values are strings (contract §6)."""

    title: str | None = None
    body: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    priority: str = "normal"  # low | normal | high | critical
    ttl: int = 3600
    collapse_key: str | None = None


@dataclass(slots=True)
class Delivery:
    """One (job, device) pair on one channel, as handed to a bridge.

    Not frozen, though bridges only read it: one is made per send, and a frozen dataclass
    sets each of its 10 fields through ``object.__setattr__`` (several times the cost of a
    plain one). Nothing hashes a Delivery or keeps one past
    its send."""

    message_id: str  # lowercase UUID; APNs apns-id
    job_id: str
    device_id: str
    channel: Channel
    notification: Notification
    options: dict[str, Any]  # the job's options for this bridge's platform (may be {})
    sent_at: datetime  # when this attempt is made (UTC)
    expires_at: datetime  # created_at + ttl (UTC); a bridge maps it to the platform's TTL
    attempt: int = 1
    # The signed URL the device may POST its ack to (contract §8, §10); None without [http].
    ack_url: str | None = None

    @property
    def ttl_remaining(self) -> int:
        """Whole seconds left until ``expires_at`` (0 = deliver now or never)."""
        return max(0, int((self.expires_at - self.sent_at).total_seconds()))

    def envelope(self) -> dict[str, Any]:
        """The §8 envelope; the payload every platform carries in its own way.

        ``ack_url`` is in it only when the HTTP API is on (the contract's envelope without
        [http] has no such key)."""
        from gateway.timeutil import iso

        out: dict[str, Any] = {
            "message_id": self.message_id,
            "job_id": self.job_id,
            "title": self.notification.title,
            "body": self.notification.body,
            "data": dict(self.notification.data),
            "priority": self.notification.priority,
            "sent_at": iso(self.sent_at),
            "expires_at": iso(self.expires_at),
        }
        if self.ack_url is not None:
            out["ack_url"] = self.ack_url
        return out

    def ids(self) -> dict[str, str]:
        """What a device acks with, as string pairs: message_id, job_id and ack_url if any.

        Every platform's payload carries these where the app can read them; they always
        win over job data or options of the same name."""
        out = {"message_id": self.message_id, "job_id": self.job_id}
        if self.ack_url is not None:
            out["ack_url"] = self.ack_url
        return out


class OutcomeKind(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # transient: try again after retry_after (or the pipeline's backoff)
    INVALID_ADDRESS = "invalid_address"  # never again to this address; fall over to the next channel
    FAILED = "failed"  # this delivery cannot succeed (payload rejected); no retry
    UNHEALTHY = "unhealthy"  # our configuration is wrong; pause the bridge, keep the work


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    reason: str = ""  # the platform's code, e.g. "Unregistered", "QUOTA_EXCEEDED", "HTTP 503"
    retry_after: float | None = None  # seconds, when the platform said (Retry-After)
    status: int | None = None  # HTTP status, where there is one

    @classmethod
    def accepted(cls, reason: str = "", status: int | None = None) -> "Outcome":
        return cls(OutcomeKind.ACCEPTED, reason, None, status)

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None, status: int | None = None) -> "Outcome":
        return cls(OutcomeKind.RETRY, reason, retry_after, status)

    @classmethod
    def invalid_address(cls, reason: str, status: int | None = None) -> "Outcome":
        return cls(OutcomeKind.INVALID_ADDRESS, reason, None, status)

    @classmethod
    def failed(cls, reason: str, status: int | None = None) -> "Outcome":
        return cls(OutcomeKind.FAILED, reason, None, status)

    @classmethod
    def unhealthy(cls, reason: str, retry_after: float | None = None, status: int | None = None) -> "Outcome":
        return cls(OutcomeKind.UNHEALTHY, reason, retry_after, status)


AckCallback = Callable[[str, bytes], Awaitable[None]]  # (device_id, Ack JSON) → stored like an MQTT ack
# Many acks at once [(device_id, Ack JSON)] → one batched commit; per ack True if stored
# (False: not stored now, send it again later). Raises if the whole batch could not be stored.
AcksCallback = Callable[[list[tuple[str, bytes]]], Awaitable[list[bool]]]


@dataclass
class BridgeContext:
    """What a bridge may use from the daemon; nothing else leaks in."""

    client: "GatewayClient | None"
    topics: "Topics"
    data_dir: Path
    on_ack: AckCallback | None = None
    on_acks: AcksCallback | None = None


class BridgeConfigError(Exception):
    """A bridge cannot start with its configuration; the message names the key."""


class Bridge(abc.ABC):
    """Base class of a platform bridge (see module docstring)."""

    platform: ClassVar[str]
    # Concurrent sends the dispatcher allows when `dispatch.max_in_flight` is unset: a
    # push platform's HTTP/2 connections take a few hundred streams; in-process and MQTT
    # sends are cheap and need more in flight to reach the fan-out goal.
    default_max_in_flight: ClassVar[int] = 200

    async def start(self) -> None:
        """Open connection pools, load keys. Raise :class:`BridgeConfigError`."""

    @abc.abstractmethod
    async def send(self, delivery: Delivery) -> Outcome:
        """Make one request; map every answer (and transport error) to an Outcome."""

    async def close(self) -> None:
        """Close pools; called once at shutdown."""
