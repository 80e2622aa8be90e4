"""Reducing a telemetry payload to the value a rule compares (contract §11).

Telemetry comes from anything on the site's broker, so every failure here is an
:class:`Unparseable` with a short reason — never another exception. The engine counts
those and logs them once per rule and topic.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_PAYLOAD = 64 * 1024
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")


class Unparseable(ValueError):
    """The payload does not yield a value for this rule; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reject_constant(name: str) -> Any:
    raise Unparseable(f"{name} is not a number")


def parse_number(text: str) -> int | float:
    """A decimal number as text (JSON's spelling, plus a leading '+'); no NaN, no infinity."""
    s = text.strip()
    if len(s) > 400 or not _NUMBER.match(s):
        raise Unparseable("not a number")
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    v = float(s)
    if not math.isfinite(v):
        raise Unparseable("number out of range")
    return v


def _as_number(v: Any) -> int | float:
    if isinstance(v, bool):
        raise Unparseable("a boolean, not a number")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise Unparseable("number out of range")
        return v
    if isinstance(v, str):
        return parse_number(v)
    raise Unparseable("an object, not a number" if isinstance(v, dict) else "an array, not a number")


def extract(payload: bytes, path: tuple[str, ...], numeric: bool) -> Any:
    """The rule's value: a number for above/below, a string/number/boolean for equals.

    ``path == ()`` means the payload itself (its text, stripped); otherwise the payload is
    a JSON object and ``path`` the dotted field (a digit segment indexes an array).
    """
    if len(payload) > MAX_PAYLOAD:
        raise Unparseable(f"payload over {MAX_PAYLOAD} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Unparseable("payload is not UTF-8") from None
    if not path:
        if numeric:
            return parse_number(text)
        return text.strip()
    try:
        node: Any = json.loads(text, parse_constant=_reject_constant)
    except Unparseable:
        raise
    except (ValueError, RecursionError):
        raise Unparseable("payload is not JSON") from None
    walked: list[str] = []
    for part in path:
        walked.append(part)
        if isinstance(node, dict):
            if part not in node:
                raise Unparseable(f"field {'.'.join(walked)} missing")
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unparseable(f"field {'.'.join(walked)} missing")
    if node is None:
        raise Unparseable(f"field {'.'.join(path)} is null")
    if numeric:
        return _as_number(node)
    if isinstance(node, (dict, list)):
        raise Unparseable(f"field {'.'.join(path)} is not a string, number or boolean")
    if isinstance(node, float) and not math.isfinite(node):
        raise Unparseable("number out of range")
    return node
