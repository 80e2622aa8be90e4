"""Builds the enabled bridges from config: platform name → bridge instance.

Each platform module exposes ``load_secrets(section, problems)`` (checks its section's
files and reads its secrets into its own typed object, at config load time) and
``build(section, ctx, secrets) -> Bridge``; adding a platform is one line in ``_BUILDERS``. Imports are lazy so a site that never enables FCM never imports
google-auth.
"""

from __future__ import annotations

import importlib
from typing import Any

from bridges.base import Bridge, BridgeContext
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


def enabled_platforms(cfg: Config) -> list[str]:
    return [name for name in _BUILDERS if getattr(cfg.bridges, name).enabled]


def load_secrets(cfg: Config, problems: Problems) -> dict[str, Any]:
    """Each enabled platform's secrets (its module's typed object, or None), problems by key."""
    out: dict[str, Any] = {}
    for name in enabled_platforms(cfg):
        module: Any = importlib.import_module(_BUILDERS[name])
        out[name] = module.load_secrets(getattr(cfg.bridges, name), problems)
    return out


def build_bridges(cfg: Config, secrets: Secrets, ctx: BridgeContext) -> dict[str, Bridge]:
    bridges: dict[str, Bridge] = {}
    for name in enabled_platforms(cfg):
        module: Any = importlib.import_module(_BUILDERS[name])
        bridges[name] = module.build(getattr(cfg.bridges, name), ctx, secrets.bridge(name))
    return bridges
