"""Which channel a delivery's next attempt uses: pure functions over a device's stored
channels list, its invalid marks and the enabled bridges. No SQL.

A fleet of MQTT devices (or the simulation) stores the same channels text for every
device, and expansion and every dispatcher pass would decode and validate it once per
delivery. A :class:`ChannelCache`, owned by whoever reads device rows (the dispatcher,
the expander), decodes each distinct text once into a :class:`ChannelList`, and the
choice for that list (when no marks are involved) is kept on the list itself: no cache
keyed by object identity, nothing shared between processes or databases.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from devices.models import Channel, channel_address, channel_bridge, raw_bridge_key

_channel_adapter: TypeAdapter[Any] = TypeAdapter(Channel)


def channel_key(channel: Any) -> str:
    """``<platform>|<address>``: how an invalid mark names a channel."""
    return f"{channel.platform}|{channel_address(channel)}"


@dataclass(slots=True)  # not frozen: one per send, and a frozen dataclass costs several times as much to make
class Route:
    """The channel a delivery's next attempt uses."""

    # The bridge: the channel's platform, or ``<platform>:<app>`` for a channel naming an
    # app of ``[bridges.<platform>.apps]`` (devices.models.bridge_key).
    platform: str
    channel: Any
    key: str


class ChannelList(list[dict[str, Any]]):
    """A device's channels as stored (JSON objects, in order of preference), decoded once
    per distinct text by a :class:`ChannelCache` and shared by every row with that text:
    read, never changed. It keeps the last channel choice made for it without marks
    (:func:`choose_channel`), for the one set of enabled bridges it was made with."""

    __slots__ = ("choice",)

    def __init__(self, items: Iterable[dict[str, Any]] = ()):
        super().__init__(items)
        self.choice: tuple[Any, Route | tuple[str, str]] | None = None


class ChannelCache:
    """Decoded channel lists by their stored text, the last ``size`` distinct texts (then
    it starts again). Push fleets (a token per device) gain nothing and pay a dict lookup."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._by_text: dict[str, ChannelList] = {}

    def __len__(self) -> int:
        return len(self._by_text)

    def get(self, text: str) -> ChannelList:
        decoded = self._by_text.get(text)
        if decoded is None:
            decoded = ChannelList(json.loads(text))
            if len(self._by_text) >= self.size:
                self._by_text.clear()
            self._by_text[text] = decoded
        return decoded


def decode(text: str, cache: ChannelCache | None = None) -> ChannelList:
    """A stored channels text as a :class:`ChannelList`, through ``cache`` when given."""
    return cache.get(text) if cache is not None else ChannelList(json.loads(text))


def choose_channel(channels: list[dict[str, Any]] | None, invalid: dict[str, Any] | Iterable[str],
                   platforms: Iterable[str], also_invalid: str | None = None) -> Route | tuple[str, str]:
    """First channel whose bridge is enabled and whose address is not marked invalid;
    else ``(final_state, error)`` for the delivery.

    Without marks to look for, the answer depends only on the channels and the enabled
    bridges: a :class:`ChannelList` keeps it for the ``platforms`` object it was asked
    with (the dispatcher asks with the same one every time). The answer (a Route with a
    frozen pydantic channel, or a tuple) is shared: read, never changed."""
    if channels is None:
        return "failed", "device removed from the registry"
    if invalid or also_invalid is not None or type(channels) is not ChannelList:
        return _choose_channel(channels, invalid, platforms, also_invalid)
    kept = channels.choice
    if kept is not None and kept[0] is platforms:
        return kept[1]
    choice = _choose_channel(channels, invalid, platforms, also_invalid)
    channels.choice = (platforms, choice)
    return choice


def _choose_channel(channels: list[dict[str, Any]], invalid: dict[str, Any] | Iterable[str],
                    platforms: Iterable[str], also_invalid: str | None) -> Route | tuple[str, str]:
    enabled = platforms if isinstance(platforms, (set, frozenset, dict)) else set(platforms)
    saw_invalid = False
    for raw in channels:
        if raw_bridge_key(raw) not in enabled and not invalid and also_invalid is None:
            continue  # no marks to look for: skip parsing channels we cannot use
        try:
            channel = _channel_adapter.validate_python(raw)
        except ValueError:
            continue
        key = channel_key(channel)
        if key in invalid or key == also_invalid:
            saw_invalid = True
            continue
        bridge = channel_bridge(channel)
        if bridge in enabled:
            return Route(bridge, channel, key)
    if saw_invalid:
        return "invalid_address", "every channel's address is invalid"
    return "failed", "no enabled bridge for any of the device's channels"


def channel_for(channels: list[dict[str, Any]] | None, invalid: dict[str, Any], platform: str) -> Route | None:
    """The device's first usable channel on bridge ``platform`` (a resend goes where the send went)."""
    for raw in channels or []:
        if raw_bridge_key(raw) != platform:
            continue
        try:
            channel = _channel_adapter.validate_python(raw)
        except ValueError:
            continue
        key = channel_key(channel)
        if key not in invalid:
            return Route(platform, channel, key)
    return None


def route_of(channels: str, invalid: str, platforms: set[str] | None, cache: ChannelCache | None = None) -> str | None:
    """The bridge of a new delivery's first attempt among ``platforms``, from the device's
    stored channels and marks (None: no usable channel, or no bridges given; the
    dispatcher routes or finishes it)."""
    if platforms is None:
        return None
    marks = json.loads(invalid) if invalid != "{}" else None  # no marks: the usual case, nothing to decode
    if not marks:  # the common case: the first channel on an enabled bridge, no parsing needed
        return next((b for b in map(raw_bridge_key, decode(channels, cache)) if b in platforms), None)
    choice = choose_channel(decode(channels, cache), marks, platforms)
    return choice.platform if isinstance(choice, Route) else None


__all__ = ["ChannelCache", "ChannelList", "Route", "channel_for", "channel_key", "choose_channel", "decode", "route_of"]
