"""The cloud link (contract §4 ``[upstream]``, §5, §6, §9): see :mod:`.link` and :mod:`.outbox`."""

from gateway.upstream.link import SOURCE, Intake, UpstreamLink

__all__ = ["SOURCE", "Intake", "UpstreamLink"]
