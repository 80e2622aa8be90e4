"""The cloud link (contract §4 ``[upstream]``, §5, §6, §9): see :mod:`.link` and :mod:`.outbox`.

Nothing is imported here: CLI commands read and migrate the outbox table (:mod:`.outbox`)
and must not bring the cloud connection's MQTT client with it.
"""
