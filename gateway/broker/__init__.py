"""The embedded MQTT 3.1.1/5.0 broker (its wire in :mod:`gateway.broker.wire`) and its accounts."""

from gateway.broker.embedded import BrokerStartError, EmbeddedBroker, InternalCredentials

__all__ = ["BrokerStartError", "EmbeddedBroker", "InternalCredentials"]
