"""The embedded MQTT broker: amqtt (pinned) with the gateway's auth and listeners.

The gateway's own core never calls into this object to move messages: it connects
to a listener as an ordinary MQTT client, exactly as in ``external`` mode. This module
only owns starting, authenticating and stopping the broker.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.session import Session

from gateway.broker.passwords import PasswordFile, PasswordFileError
from gateway.config import Config, ListenerSection

log = structlog.get_logger(__name__)

INTERNAL_USERNAME = "homepot-gateway"


class BrokerStartError(Exception):
    """The broker could not start (port in use, bad certificate); the message is one line."""


@dataclass(frozen=True)
class InternalCredentials:
    """Per-process credentials of the gateway's own client (role ``admin``)."""

    username: str
    password: str

    @classmethod
    def generate(cls) -> "InternalCredentials":
        return cls(INTERNAL_USERNAME, secrets.token_urlsafe(32))


class GatewayBroker(Broker):
    """amqtt's broker, authenticating per listener against the gateway's account file."""

    def __init__(self, config: BrokerConfig, listeners: dict[str, ListenerSection],
                 passwords: PasswordFile, internal: InternalCredentials, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._gw_listeners = listeners
        self._passwords = passwords
        self._internal = internal
        self.auth_failures = 0

    def _listener_section(self, listener: ListenerConfig) -> ListenerSection | None:
        for name, cfg in self.listeners_config.items():
            if cfg is listener:
                return self._gw_listeners.get(name)
        return None

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        section = self._listener_section(listener)
        role = self.resolve_role(session, section)
        session.homepot_role = role  # type: ignore[attr-defined]
        if role is None:
            self.auth_failures += 1
            log.info("mqtt auth refused", client_id=session.client_id, username=session.username,
                     listener=section.name if section else None)
            return False
        return True

    def resolve_role(self, session: Session, section: ListenerSection | None) -> str | None:
        """The session's role, or None when it may not connect."""
        username, password = session.username, session.password
        if username:
            if username == self._internal.username:
                return "admin" if secrets.compare_digest(password or "", self._internal.password) else None
            try:
                account = self._passwords.verify(username, password or "")
            except PasswordFileError as exc:
                log.error("password file unreadable", error=str(exc))
                return None
            return account.role if account else None
        if section is not None and section.allow_anonymous:
            return section.anonymous_role
        return None


def _amqtt_listener(section: ListenerSection) -> ListenerConfig:
    kind = ListenerType.WS if section.type in ("ws", "wss") else ListenerType.TCP
    return ListenerConfig(
        type=kind,
        bind=section.bind,
        ssl=section.secure,
        certfile=section.certfile,
        keyfile=section.keyfile,
        cafile=section.cafile,
    )


def build_amqtt_config(cfg: Config) -> tuple[BrokerConfig, dict[str, ListenerSection]]:
    """Translate our listeners to amqtt's; every listener is fully specified so amqtt's
    "inherit from the default listener" rule can never leak TLS settings between them."""
    listeners: dict[str, ListenerConfig] = {}
    by_name: dict[str, ListenerSection] = {}
    for index, section in enumerate(cfg.broker.listeners):
        name = "default" if index == 0 else section.name
        listeners[name] = _amqtt_listener(section)
        by_name[name] = section
    broker_cfg = BrokerConfig(listeners=listeners, plugins={})
    # BrokerConfig.__post_init__ copied default values into unset fields: undo it.
    for name, section in by_name.items():
        if name != "default":
            listeners[name].ssl = section.secure
            listeners[name].certfile = section.certfile
            listeners[name].keyfile = section.keyfile
            listeners[name].cafile = section.cafile
            listeners[name].type = ListenerType.WS if section.type in ("ws", "wss") else ListenerType.TCP
    return broker_cfg, by_name


def _check_tls(section: ListenerSection) -> None:
    """Load the listener's certificate now so a bad one is a clear error, not a traceback."""
    if not section.secure:
        return
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(section.certfile), str(section.keyfile))
        if section.cafile:
            ctx.load_verify_locations(cafile=str(section.cafile))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BrokerStartError(
            f"broker.listeners[{section.name}]: cannot load certificate: {getattr(exc, 'reason', None) or exc}"
        ) from None


class EmbeddedBroker:
    """Lifecycle wrapper: ``async with EmbeddedBroker(cfg, creds):`` listens until exit."""

    def __init__(self, cfg: Config, internal: InternalCredentials):
        self._cfg = cfg
        self.internal = internal
        self.broker: GatewayBroker | None = None

    async def start(self) -> None:
        for section in self._cfg.broker.listeners:
            _check_tls(section)
        amqtt_cfg, by_name = build_amqtt_config(self._cfg)
        passwords = PasswordFile(Path(self._cfg.broker.auth.password_file))
        broker = GatewayBroker(amqtt_cfg, by_name, passwords, self.internal)
        self._apply_client_cert_policy(broker, by_name)
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_drop_startup_traceback)
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps every start failure in BrokerError
            cause = exc.__cause__ or exc
            raise BrokerStartError(_describe_start_error(cause, self._cfg)) from None
        finally:
            amqtt_log.removeFilter(_drop_startup_traceback)
        self.broker = broker
        log.info("embedded broker listening",
                 listeners=[f"{s.name}={s.type}://{s.bind}" for s in self._cfg.broker.listeners])

    @staticmethod
    def _apply_client_cert_policy(broker: GatewayBroker, by_name: dict[str, ListenerSection]) -> None:
        """amqtt makes client certificates optional; ``require_client_cert`` makes them required."""
        original = broker._create_ssl_context

        def create(listener: ListenerConfig) -> ssl.SSLContext:
            ctx = original(listener)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            for name, cfg in broker.listeners_config.items():
                if cfg is listener and by_name[name].require_client_cert:
                    ctx.verify_mode = ssl.CERT_REQUIRED
            return ctx

        broker._create_ssl_context = create  # type: ignore[method-assign]

    async def stop(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.shutdown()

    async def __aenter__(self) -> "EmbeddedBroker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _drop_startup_traceback(record: logging.LogRecord) -> bool:
    """amqtt logs its own start failure with a traceback; we report it as one line instead."""
    return record.getMessage() != "Broker startup failed"


def _describe_start_error(exc: BaseException, cfg: Config) -> str:
    if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE (Linux, BSD)
        return f"broker.listeners: address already in use ({exc.strerror}): " + ", ".join(
            s.bind for s in cfg.broker.listeners)
    if isinstance(exc, OSError) and exc.errno == 13:
        return f"broker.listeners: permission denied binding {', '.join(s.bind for s in cfg.broker.listeners)}"
    if isinstance(exc, OSError) and exc.errno == 99:
        return f"broker.listeners: cannot bind: address not available: {', '.join(s.bind for s in cfg.broker.listeners)}"
    return f"broker: cannot start: {exc}"
