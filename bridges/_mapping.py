"""What a job's platform-neutral fields become on each platform, in one place.

The job says ``priority`` (low | normal | high | critical) and ``collapse_key``; each
platform has its own words and limits for them. Keeping the tables side by side is what
makes "critical means the same everywhere" reviewable.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from bridges.base import Outcome

# job priority → the platform's value. APNs' is the priority of an alert push (background
# pushes are always 5); WNS is X-WNS-Priority (1 High … 4, 4 only via options); Web Push is
# the Urgency header. No platform has "critical": it is the highest each one offers (APNs
# also sets interruption-level time-sensitive, see bridges.apns).
PRIORITY: dict[str, dict[str, str]] = {
    "low":      {"fcm": "normal", "apns": "5",  "wns": "3", "webpush": "low"},
    "normal":   {"fcm": "normal", "apns": "10", "wns": "2", "webpush": "normal"},
    "high":     {"fcm": "high",   "apns": "10", "wns": "1", "webpush": "high"},
    "critical": {"fcm": "high",   "apns": "10", "wns": "1", "webpush": "high"},
}


def priority(platform: str, job_priority: str) -> str:
    return PRIORITY.get(job_priority, PRIORITY["normal"])[platform]


def collapse_id(value: str, max_len: int, alphabet: str, pattern: re.Pattern[str] | None = None) -> str:
    """``value`` if the platform takes it as it is, else a digest of it that fits.

    A key that is too long (or outside the platform's alphabet) is replaced by the first
    ``max_len`` characters of its SHA-256 (``alphabet`` "hex" or "base64url"), never cut:
    cutting would make two different keys collapse into each other.
    """
    if len(value) <= max_len and (pattern is None or pattern.fullmatch(value)):
        return value
    digest = hashlib.sha256(value.encode()).digest()
    if alphabet == "hex":
        return digest.hex()[:max_len]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:max_len]


def unknown_option(platform: str, options: dict[str, Any], known: Iterable[str]) -> Outcome | None:
    """A failed Outcome naming the first unknown ``options.<platform>`` key (typos must not
    pass silently), for bridges whose options are a closed set."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        return Outcome.failed(f"options.{platform}.{unknown[0]}: unknown option")
    return None


__all__ = ["PRIORITY", "collapse_id", "priority", "unknown_option"]
