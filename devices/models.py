"""The Device object of contract §7, as accepted on ``P/devices/<id>/register`` and the CLI.

Channels are kept in order of preference; the platform decides which address field a
channel carries. Unknown fields are errors that name the field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.ids import DEVICE_ID_RE, NOT_DOTS, is_id

PLATFORMS = ("fcm", "apns", "wns", "webpush", "mqtt", "simulation")
PUSH_PLATFORMS = ("fcm", "apns", "wns", "webpush")  # those with `[bridges.<platform>.apps]`
# An app of [bridges.<platform>.apps]; a channel without one uses the section's own credentials.
AppName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def bridge_key(platform: str, app: str | None = None) -> str:
    """The bridge a channel goes through: its platform, or ``<platform>:<app>`` for an app
    of ``[bridges.<platform>.apps]`` (each app is its own bridge: credentials, token cache,
    connections, health)."""
    return f"{platform}:{app}" if app else platform


def split_bridge_key(key: str) -> tuple[str, str | None]:
    """``"fcm:shop-app"`` → ``("fcm", "shop-app")``; ``"fcm"`` → ``("fcm", None)``."""
    platform, _, app = key.partition(":")
    return platform, app or None


def raw_bridge_key(raw: dict) -> str | None:
    """:func:`bridge_key` of a stored channel (a JSON object), without validating it."""
    platform = raw.get("platform")
    app = raw.get("app")
    if app and isinstance(platform, str):
        return f"{platform}:{app}"
    return platform if isinstance(platform, str) else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FcmChannel(_Strict):
    platform: Literal["fcm"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]
    app: AppName | None = None


class ApnsChannel(_Strict):
    platform: Literal["apns"]
    token: str
    app: AppName | None = None

    @field_validator("token")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64,200}", v) or len(v) % 2:
            raise ValueError("must be the device token in hex (64 hex digits)")
        return v.lower()


class WnsChannel(_Strict):
    platform: Literal["wns"]
    channel_uri: Annotated[str, Field(min_length=1, max_length=2048)]
    app: AppName | None = None

    @field_validator("channel_uri")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return v


class WebPushKeys(_Strict):
    p256dh: Annotated[str, Field(min_length=1, max_length=256)]
    auth: Annotated[str, Field(min_length=1, max_length=64)]


class WebPushSubscription(_Strict):
    endpoint: Annotated[str, Field(min_length=1, max_length=2048)]
    keys: WebPushKeys
    # Browsers' PushSubscription.toJSON() includes this; accepted and ignored.
    expirationTime: int | float | None = None


class WebPushChannel(_Strict):
    platform: Literal["webpush"]
    subscription: WebPushSubscription
    app: AppName | None = None


class MqttChannel(_Strict):
    platform: Literal["mqtt"]


class SimulationChannel(_Strict):
    platform: Literal["simulation"]


Channel = Annotated[
    Union[FcmChannel, ApnsChannel, WnsChannel, WebPushChannel, MqttChannel, SimulationChannel],
    Field(discriminator="platform"),
]


class Device(_Strict):
    device_id: str
    segment: Annotated[str, Field(max_length=128)] | None = None
    tags: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=64)] = Field(default_factory=list)
    channels: Annotated[list[Channel], Field(min_length=1, max_length=16)]
    # The person (contract §12) the device belongs to: a label shown with the device; whom
    # a job reaches through it is the person's own reach order (Person.devices).
    owner: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] | None = None

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not is_id(DEVICE_ID_RE, v):
            raise ValueError(f"must match [A-Za-z0-9._:-]{{1,128}} {NOT_DOTS}")
        return v

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v is not None and v in (".", ".."):
            raise ValueError(f"must match [A-Za-z0-9._:-]{{1,64}} {NOT_DOTS} (a person_id)")
        return v


def channel_bridge(channel: BaseModel) -> str:
    """:func:`bridge_key` of a validated channel."""
    return bridge_key(channel.platform, getattr(channel, "app", None))  # type: ignore[attr-defined]


def app_problems(device: Device, apps: Mapping[str, Collection[str]]) -> list[tuple[str, str]]:
    """(field, message) for each channel naming an app its platform's section does not have
    (``apps``: platform → the names of ``[bridges.<platform>.apps]``)."""
    out = []
    for i, channel in enumerate(device.channels):
        app = getattr(channel, "app", None)
        if app is not None and app not in apps.get(channel.platform, ()):
            known = ", ".join(sorted(apps.get(channel.platform, ()))) or "none"
            out.append((f"channels.{i}.app",
                        f"no app {app!r} in [bridges.{channel.platform}.apps] (configured: {known})"))
    return out


def channel_address(channel: BaseModel) -> str:
    """The channel's address as one string (token, URI, subscription JSON, or '')."""
    if isinstance(channel, (FcmChannel, ApnsChannel)):
        return channel.token
    if isinstance(channel, WnsChannel):
        return channel.channel_uri
    if isinstance(channel, WebPushChannel):
        return channel.subscription.model_dump_json(exclude_none=True)
    return ""
