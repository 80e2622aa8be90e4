"""What the CLI's options become, and its errors in the CLI's own words.

The models (contract §6, §7) name fields as the JSON does (``channels.0.fcm.token``,
``target.devices.0``); someone who typed ``--address`` or ``--device`` should read those
names back. ``devices import`` shares the channel building so a CSV row and a
``devices add`` mean the same thing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

ADDRESS_FIELD = {"fcm": "token", "apns": "token", "wns": "channel_uri"}
ADDRESS_HELP = {"fcm": "the FCM registration token", "apns": "the APNs device token (hex)",
                "wns": "the WNS channel URI", "webpush": "the subscription JSON"}
PLATFORM_NAMES = ("fcm", "apns", "wns", "webpush", "mqtt", "simulation")


class OptionError(ValueError):
    """Bad CLI input; ``str()`` is one ``--option: message`` line."""


def build_channel(platform: str, address: str, where: str = "--address",
                  platform_where: str = "--platform") -> dict[str, Any]:
    """One channel dict from a platform name and its address string (contract §7)."""
    if platform in ADDRESS_FIELD:
        if not address:
            raise OptionError(f"{where}: {platform} needs {ADDRESS_HELP[platform]}")
        return {"platform": platform, ADDRESS_FIELD[platform]: address}
    if platform == "webpush":
        try:
            subscription = json.loads(address)
        except json.JSONDecodeError as exc:
            raise OptionError(f"{where}: webpush needs the subscription JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno} (character {exc.pos + 1})") from None
        if not isinstance(subscription, dict):
            raise OptionError(f"{where}: webpush needs the subscription JSON object "
                              '{"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}}')
        return {"platform": platform, "subscription": subscription}
    if platform in ("mqtt", "simulation"):
        if address:
            raise OptionError(f"{where}: {platform} takes no address (give an empty one or none)")
        return {"platform": platform}
    raise OptionError(f"{platform_where}: unknown platform {platform!r} (one of {', '.join(PLATFORM_NAMES)})")


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required"
    if err["type"] == "string_pattern_mismatch":
        pattern = str(err.get("ctx", {}).get("pattern", ""))
        return f"must match {pattern.strip('^$')}" if pattern else err["msg"]
    msg = str(err["msg"])
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _loc(err: dict[str, Any]) -> list[Any]:
    return [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-")))]


def device_errors(exc: ValidationError, channel_where: Callable[[int], Any],
                  names: dict[str, Any]) -> list[tuple[Any, str]]:
    """Device validation errors as ``(where, message)`` pairs.

    ``channel_where(index)`` names the option, column or line of channel ``index``;
    ``names`` does the same for ``device_id``/``segment``/``tags``/``channels``. The message
    names what is wrong inside a subscription (``subscription.keys.auth: required``).
    """
    out: list[tuple[Any, str]] = []
    for err in exc.errors():
        loc = _loc(err)
        msg = _message(err)
        if loc and loc[0] == "channels" and len(loc) >= 2 and isinstance(loc[1], int):
            rest = loc[2:]
            inner = [str(p) for p in rest[1:]] if rest and rest[0] in PLATFORM_NAMES else [str(p) for p in rest]
            inner_text = ".".join(inner)
            shown = f"{inner_text}: {msg}" if inner and inner_text not in ADDRESS_FIELD.values() else msg
            out.append((channel_where(loc[1]), shown))
        elif loc and loc[0] in names:
            value = err.get("input")
            shown = f"{value!r}: " if loc[0] == "tags" and len(loc) > 1 and isinstance(value, str) else ""
            out.append((names[loc[0]], f"{shown}{msg}"))
        else:
            out.append((".".join(str(p) for p in loc) or "device", msg))
    return out


def add_device_errors(exc: ValidationError, platforms: Sequence[str]) -> list[str]:
    """``devices add`` errors: ``--address``, ``--platform``, ``ID``, ``--segment``, ``--tag``."""
    many = len(platforms) > 1

    def where(index: int) -> str:
        return f"--address[{index}] ({platforms[index]})" if many and index < len(platforms) else "--address"

    pairs = device_errors(exc, where, {"device_id": "ID", "segment": "--segment", "tags": "--tag",
                                       "channels": "--platform", "owner": "--owner"})
    return [f"{where_}: {message}" for where_, message in pairs]


_JOB_OPTION = {("job_id",): "--job-id", ("notification", "title"): "--title", ("notification", "body"): "--body",
               ("notification", "priority"): "--priority", ("notification", "ttl"): "--ttl",
               ("notification", "collapse_key"): "--collapse-key", ("target", "segment"): "--segment",
               ("target", "all"): "--all"}


def job_errors(exc: ValidationError, devices: Sequence[str] | None) -> list[str]:
    """``send`` errors: ``--device 'x y': must match ...``, ``--data K: ...``, ``--ttl: ...``."""
    out: list[str] = []
    for err in exc.errors():
        loc = _loc(err)
        msg = _message(err)
        key = tuple(loc[:2])
        if loc[:2] == ["target", "people"]:
            out.append(f"--person: {msg}" if len(loc) < 3 else f"--person[{loc[2]}]: {msg}")
        elif loc[:2] == ["target", "devices"]:
            if len(loc) >= 3 and isinstance(loc[2], int) and devices and loc[2] < len(devices):
                out.append(f"--device {devices[loc[2]]!r}: {msg}")
            else:
                out.append(f"--device: {msg}")
        elif loc[:2] == ["notification", "data"]:
            name = f" {loc[2]}" if len(loc) >= 3 else ""
            out.append(f"--data{name}: {msg}")
        elif key in _JOB_OPTION or tuple(loc[:1]) in _JOB_OPTION:
            out.append(f"{_JOB_OPTION.get(key) or _JOB_OPTION[tuple(loc[:1])]}: {msg}")
        elif loc == ["notification"] and msg.startswith("nothing to notify"):
            out.append("--title, --body, --data: nothing to notify: give at least one of them")
        elif loc == ["target"]:
            out.append(f"target: {msg.replace('devices, segment, all or people', '--device, --segment, --all or --person')}")
        else:
            out.append(f"{'.'.join(str(p) for p in loc) or 'job'}: {msg}")
    return out


_DATA_KEY = re.compile(r"^[^=]+$")


def parse_data(items: Sequence[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _DATA_KEY.fullmatch(key):
            raise OptionError(f"--data: expected K=V, got {item!r}")
        pairs[key] = value
    return pairs


__all__ = ["ADDRESS_FIELD", "OptionError", "add_device_errors", "build_channel", "device_errors", "job_errors",
           "parse_data"]
