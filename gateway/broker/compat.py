"""Start-up check that amqtt still has every internal the gateway's broker relies on.

:class:`~gateway.broker.embedded.GatewayBroker` and
:class:`~gateway.broker.handler.GatewayProtocolHandler` override private amqtt methods
and touch private attributes. amqtt is pinned exactly for that reason, but a
hand-upgraded venv or a distribution package could bring another version: then an
override whose base method was renamed would silently never be called (amqtt's own,
incorrect flow would run instead), or the broker would fail on the first client with
an ``AttributeError``. So the broker checks at start and refuses to run with one clear
line naming what is missing and the version it was built against.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

PINNED_AMQTT = "0.12.1"   # pyproject.toml pins amqtt==0.12.1


class AmqttMismatch(RuntimeError):
    """amqtt lacks something the gateway's broker overrides or uses."""


@dataclass(frozen=True)
class Requirement:
    """What must exist on one amqtt class: methods on the class, attributes on an instance."""

    cls: type
    methods: tuple[str, ...]
    attributes: tuple[str, ...] = ()


def requirements() -> list[Requirement]:
    from amqtt.broker import Broker
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    return [
        Requirement(Broker, methods=(
            # overridden by GatewayBroker
            "_create_ssl_context", "_session_monitor", "_initialize_client_session", "_handle_client_session",
            "_handle_disconnect", "_handle_subscription", "_handle_unsubscription", "_stop_handler",
            "internal_message_broadcast", "shutdown",
            # called by GatewayBroker, or the amqtt flow that calls our overrides
            "start", "_client_connected", "_client_message_loop", "_shutdown_broadcast_loop",
        ), attributes=("_sessions", "_servers", "_session_monitor_task", "_broadcast_task", "plugins_manager",
                       "transitions", "listeners_config")),
        Requirement(BrokerProtocolHandler, methods=(
            # overridden by GatewayProtocolHandler
            "handle_read_timeout", "handle_publish", "handle_pubrel", "handle_puback", "handle_pubrec",
            "handle_pubcomp",
            # called
            "init_from_connect", "attach", "start", "stop", "wait_disconnect", "mqtt_acknowledge_subscription",
            "mqtt_acknowledge_unsubscription", "get_next_pending_subscription", "get_next_pending_unsubscription",
            "_reader_loop",
        ), attributes=("_write_lock", "_disconnect_waiter", "reader", "writer", "session")),
        Requirement(Session, methods=(), attributes=(
            "client_id", "username", "password", "keep_alive", "clean_session", "will_flag", "will_topic",
            "will_message", "will_qos", "will_retain", "transitions")),
    ]


def installed_version() -> str:
    try:
        return metadata.version("amqtt")
    except metadata.PackageNotFoundError:
        return "unknown"


def check(reqs: list[Requirement], instances: dict[type, Any] | None = None) -> None:
    """Raise :class:`AmqttMismatch` naming the first missing method or attribute.

    ``instances`` maps a class to an instance of it, for attributes that only exist
    once ``__init__`` ran; a class without one has its attributes looked up on the class.
    """
    instances = instances or {}
    for req in reqs:
        for name in req.methods:
            if not callable(getattr(req.cls, name, None)):
                raise AmqttMismatch(_message(req.cls, name, "method"))
        target = instances.get(req.cls, req.cls)
        for name in req.attributes:
            if not hasattr(target, name):
                raise AmqttMismatch(_message(req.cls, name, "attribute"))


def _message(cls: type, name: str, kind: str) -> str:
    return (f"amqtt {installed_version()} has no {kind} {cls.__module__}.{cls.__qualname__}.{name}, which the "
            f"gateway's broker relies on; it is built against amqtt=={PINNED_AMQTT} "
            f"(pip install 'amqtt=={PINNED_AMQTT}')")


def check_amqtt(broker: Any) -> None:
    """The check for the running versions: ``broker`` is a constructed (not started) Broker."""
    from amqtt.broker import Broker
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    handler = BrokerProtocolHandler(broker.plugins_manager)
    check(requirements(), {Broker: broker, BrokerProtocolHandler: handler, Session: Session()})
