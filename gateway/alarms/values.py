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
    if len(s) > 400 or not _NUMBER.fullmatch(s):
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


# One decoder: json.loads() with any keyword builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class Payload:
    """One message's payload, decoded at most once however many rules read it."""

    __slots__ = ("raw", "_text", "_json")
    _UNSET: Any = object()

    def __init__(self, raw: bytes):
        self.raw = raw
        self._text: str | Unparseable | None = None
        self._json: Any = self._UNSET

    def text(self) -> str:
        if self._text is None:
            if len(self.raw) > MAX_PAYLOAD:
                self._text = Unparseable(f"payload over {MAX_PAYLOAD} bytes")
            else:
                try:
                    self._text = self.raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._text = Unparseable("payload is not UTF-8")
        if isinstance(self._text, Unparseable):
            raise self._text
        return self._text

    def json(self) -> Any:
        if self._json is self._UNSET:
            try:
                self._json = _DECODER.decode(self.text())
            except Unparseable as exc:
                self._json = exc
            except (ValueError, RecursionError):
                self._json = Unparseable("payload is not JSON")
        if isinstance(self._json, Unparseable):
            raise self._json
        return self._json


def extract(payload: bytes | Payload, path: tuple[str, ...], numeric: bool) -> Any:
    """The rule's value: a number for above/below, a string/number/boolean for equals.

    ``path == ()`` means the payload itself (its text, stripped); otherwise the payload is
    a JSON object and ``path`` the dotted field (a digit segment indexes an array).
    """
    p = payload if isinstance(payload, Payload) else Payload(payload)
    if not path:
        if numeric:
            return parse_number(p.text())
        return p.text().strip()
    node: Any = p.json()
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
