"""Builds the enabled bridges from config: bridge name → bridge instance.

A bridge is one platform's section (``fcm``), or one app of it (``fcm:shop-app``, from
``[bridges.fcm.apps.shop-app]``): each app is a bridge of its own, with its own
credentials, token cache, connections and health, so one app's broken key pauses only
that app (devices.models.bridge_key). An app's section is the platform's with the app's
keys put over it.

Each platform module exposes ``load_secrets(section, problems, key)`` (checks the
section's files and reads its secrets into its own typed object, at config load time;
problems are named under ``key``, e.g. ``bridges.fcm.apps.shop-app``) and ``build(section,
ctx, secrets, key) -> Bridge``; adding a platform is one line in ``_BUILDERS``. Imports
are lazy so a site that never enables FCM never imports google-auth.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bridges.base import Bridge, BridgeContext
from devices.models import bridge_key, split_bridge_key
from gateway.config import Config, Secrets
from gateway.secret_files import Problems

# platform → module exposing build(section, ctx)
_BUILDERS: dict[str, str] = {
    "simulation": "bridges.simulation",
    "mqtt": "bridges.mqtt",
    "fcm": "bridges.fcm",
    "apns": "bridges.apns",
    "wns": "bridges.wns",
    "webpush": "bridges.webpush",
}


@dataclass(frozen=True)
class BridgeSection:
    """One bridge to build: its name, platform, effective section and config key."""

    name: str  # "fcm" or "fcm:shop-app"
    platform: str
    section: Any
    key: str  # "bridges.fcm" or "bridges.fcm.apps.shop-app": what its problems are named under


def enabled_platforms(cfg: Config) -> list[str]:
    return [name for name in _BUILDERS if getattr(cfg.bridges, name).enabled]


def bridge_sections(cfg: Config) -> Iterator[BridgeSection]:
    """Every enabled platform's section, then each of its apps' (the section with the app's
    keys over it, and no apps of its own)."""
    for platform in enabled_platforms(cfg):
        section = getattr(cfg.bridges, platform)
        yield BridgeSection(platform, platform, section, f"bridges.{platform}")
        for app, overrides in (getattr(section, "apps", None) or {}).items():
            effective = section.model_copy(update={**overrides.overrides(), "apps": {}})
            yield BridgeSection(bridge_key(platform, app), platform, effective, f"bridges.{platform}.apps.{app}")


def app_names(cfg: Config) -> dict[str, frozenset[str]]:
    """platform → the names of its ``[bridges.<platform>.apps]`` (every push platform, enabled
    or not: a device may be registered before its platform is switched on)."""
    return {name: frozenset(getattr(getattr(cfg.bridges, name), "apps", None) or ()) for name in _BUILDERS}


def bridge_of_key(config_key: str) -> str:
    """The bridge a config key belongs to: ``bridges.fcm.apps.a.key_file`` → ``fcm:a``."""
    parts = config_key.split(".")
    if len(parts) >= 4 and parts[2] == "apps":
        return bridge_key(parts[1], parts[3])
    return parts[1] if len(parts) > 1 else config_key


def platform_of(bridge: str) -> str:
    return split_bridge_key(bridge)[0]


def load_secrets(cfg: Config, problems: Problems) -> dict[str, Any]:
    """Each enabled bridge's secrets (its module's typed object, or None), problems by key."""
    out: dict[str, Any] = {}
    for b in bridge_sections(cfg):
        module: Any = importlib.import_module(_BUILDERS[b.platform])
        out[b.name] = module.load_secrets(b.section, problems, b.key)
    return out


def build_bridges(cfg: Config, secrets: Secrets, ctx: BridgeContext) -> dict[str, Bridge]:
    bridges: dict[str, Bridge] = {}
    for b in bridge_sections(cfg):
        module: Any = importlib.import_module(_BUILDERS[b.platform])
        bridges[b.name] = module.build(b.section, ctx, secrets.bridge(b.name), b.key)
    return bridges
