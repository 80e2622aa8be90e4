"""The cloud link (contract §4 ``[upstream]``, §5, §6, §9): see :mod:`.link` and :mod:`.outbox`.

The link is imported only when asked for (``from gateway.upstream import UpstreamLink``
still works): CLI commands read and migrate the outbox table (:mod:`.outbox`) and must not
bring the cloud connection's MQTT client with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SOURCE", "Intake", "UpstreamLink"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gateway.upstream import link

        return getattr(link, name)
    raise AttributeError(f"module 'gateway.upstream' has no attribute {name!r}")
