"""The one rule for ids that the gateway puts into topics and URLs.

A device_id, job_id, account name, rule name or site_id becomes one MQTT topic level
(``P/devices/<id>/notify``, ``P/jobs/<id>/status``) and one URL path segment
(``/v1/devices/<id>``). Each has its pattern (``^[...]{1,N}$``); the pattern must match the
whole value (``fullmatch``: with ``re.match`` the ``$`` also matches before a trailing
newline, so ``"dev-z\\n"`` passed), and a value may not be ``.`` or ``..``, which URL
clients resolve as dot-segments instead of sending them as a segment.
"""

from __future__ import annotations

import re
from typing import Any

DOT_SEGMENTS = frozenset((".", ".."))
# Here, not in devices/models.py, so that checking a device id (the people and config models)
# does not build every device model.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NOT_DOTS = "and not be '.' or '..'"


def is_id(pattern: re.Pattern[str], value: Any) -> bool:
    """True when ``value`` is a string that ``pattern`` matches whole and not a dot-segment."""
    return type(value) is str and pattern.fullmatch(value) is not None and value not in DOT_SEGMENTS


def not_dot_segment(value: str) -> str:
    """A pydantic after-validator (its ``pattern=`` cannot express this: no look-arounds)."""
    if value in DOT_SEGMENTS:
        raise ValueError(f"must not be {value!r} (a URL dot-segment)")
    return value


__all__ = ["DEVICE_ID_RE", "DOT_SEGMENTS", "NOT_DOTS", "is_id", "not_dot_segment"]
