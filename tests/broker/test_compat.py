"""The start-up check of the amqtt internals the gateway's broker overrides or uses."""

from __future__ import annotations

import pytest
from amqtt.broker import Broker

from gateway.broker import BrokerStartError, EmbeddedBroker, InternalCredentials
from gateway.broker.compat import PINNED_AMQTT, AmqttMismatch, Requirement, check, requirements
from tests.broker.helpers import broker_config
from tests.support import free_port


def test_a_missing_method_is_named_with_the_pinned_version():
    class FakeBase:
        def _handle_subscription(self) -> None: ...

    with pytest.raises(AmqttMismatch) as err:
        check([Requirement(FakeBase, methods=("_handle_subscription", "_handle_unsubscription"))])
    message = str(err.value)
    assert "FakeBase._handle_unsubscription" in message and f"amqtt=={PINNED_AMQTT}" in message
    assert "method" in message


def test_a_missing_instance_attribute_is_named():
    class FakeBase:
        def __init__(self) -> None:
            self._sessions: dict = {}

    check([Requirement(FakeBase, methods=(), attributes=("_sessions",))], {FakeBase: FakeBase()})
    with pytest.raises(AmqttMismatch, match=r"attribute .*FakeBase\._write_lock"):
        check([Requirement(FakeBase, methods=(), attributes=("_write_lock",))], {FakeBase: FakeBase()})


def test_the_installed_amqtt_has_everything():
    # The real classes; instances are created by the broker at start (next test).
    reqs = [Requirement(r.cls, r.methods) for r in requirements()]
    check(reqs)


async def test_broker_refuses_to_start_when_amqtt_lost_an_overridden_method(tmp_path, monkeypatch):
    monkeypatch.delattr(Broker, "_handle_unsubscription")
    port = free_port()
    broker = EmbeddedBroker(broker_config(tmp_path, port), InternalCredentials.generate())
    with pytest.raises(BrokerStartError, match=r"amqtt\.broker\.Broker\._handle_unsubscription.*amqtt==0\.12\.1"):
        await broker.start()
    monkeypatch.undo()
    # Nothing was left listening or open: the same port starts fine afterwards.
    broker = EmbeddedBroker(broker_config(tmp_path, port), InternalCredentials.generate())
    await broker.start()
    await broker.stop()
