"""The embedded broker (amqtt) and its accounts."""

from gateway.broker.embedded import BrokerStartError, EmbeddedBroker, InternalCredentials

__all__ = ["BrokerStartError", "EmbeddedBroker", "InternalCredentials"]
