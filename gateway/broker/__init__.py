"""The embedded MQTT 3.1.1/5.0 broker (its wire in :mod:`gateway.broker.wire`) and its accounts.

``from gateway.broker import EmbeddedBroker`` still works, but the broker is imported only
when asked for: the package also holds tables that CLI commands read and migrate
(``state``, ``passwords``, ``presence``), which must not bring the broker's wire,
websockets and argon2 with them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BrokerStartError", "EmbeddedBroker", "InternalCredentials"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gateway.broker import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'gateway.broker' has no attribute {name!r}")
