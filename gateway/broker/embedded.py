"""The embedded MQTT broker: amqtt (pinned) made to keep MQTT 3.1.1's promises.

The gateway's own core never calls into this object to move messages: it connects
to a listener as an ordinary MQTT client, exactly as in ``external`` mode.

What amqtt still does: listeners (TCP, TLS, websockets), accepting connections,
decoding packets (its reader loop) and writing the CONNECT-time error CONNACKs.
What :class:`GatewayBroker` overrides, because amqtt 0.12.1 gets it wrong:

- authentication happens before the client id touches any session, so a client
  with a bad password can neither take over nor wipe someone's session; bad
  credentials get CONNACK 0x04, a refused anonymous client 0x05;
- sessions, subscriptions, retained messages and offline queues live in
  :mod:`gateway.broker.clients` and :mod:`gateway.broker.state` (SQLite), with
  delivered QoS = min(publish, subscription) [MQTT-3.8.4-6], RETAIN=1 only for
  retained messages sent because of a new subscription [MQTT-3.3.1-8/9], retained
  messages only for the subscribing client's new filters [MQTT-3.3.1-6], an offline
  queue for every persistent session (named or anonymous) bounded by
  ``max_queued_messages``, and in-flight messages resent with DUP=1 [MQTT-4.4.0-1];
- keepalive is enforced (1.5 × keepalive), also against a client stalled in the
  middle of a packet, and the will is published on every abnormal close [MQTT-3.1.2-24];
- per-role ACLs on publish, subscribe and delivery (retained and queued included);
- a session belongs to the principal that made it (a username, or "anonymous on
  listener X"): a CONNECT from anyone else with its client id is refused (0x05)
  before anything is touched, and the gateway's own client id is reserved for the
  gateway's account;
- a denied publish is logged once per client and topic per minute, and counted;
- retained messages live in a bounded topic trie (:mod:`gateway.broker.retained`);
- ``$SYS/broker/...`` is published inside the broker (:mod:`gateway.broker.sys`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from gateway import clock
from gateway.broker import compat
from gateway.broker.acl import ClientAcl
from gateway.broker.clients import GATEWAY_MAX_INFLIGHT, MAX_INFLIGHT, ClientState, Message, Outgoing
from gateway.broker.accounts import AccountWatcher
from gateway.broker.codec import PUBACK, PUBCOMP, PUBREC, encode_ack, encode_connack
from gateway.broker.handler import GatewayProtocolHandler, StallGuard, abort_transport
from gateway.broker.limits import (MAX_CONNECT_PACKET, SERVER_UNAVAILABLE, ClientLimits, Limit, LimitPolicy,
                                   ConnectionCount, LimitRecorder, LimitVerdict, RateBucket, RetainedQuota)
from gateway.broker.matching import SubscriptionIndex, matches, valid_topic_filter, valid_topic_name
from gateway.broker.metrics import BrokerMetrics
from gateway.broker.passwords import PasswordFile, PasswordFileError
from gateway.broker.retained import MAX_RETAINED_BYTES, MAX_RETAINED_MESSAGES, RetainedStore
from gateway.broker.state import LoadedState, StateNotStored, StateStore
from gateway.broker.systopics import SYS_INTERVAL_S, SysPublisher
from gateway.broker.throttle import LogThrottle
from gateway.config import AclRule, Config, ListenerSection
from gateway.storage import Database

log = structlog.get_logger(__name__)

INTERNAL_USERNAME = "homepot-gateway"
CONNECT_TIMEOUT_S = 10.0     # a connection that sends no CONNECT is closed [MQTT-3.1.0-1]
PACKET_TIMEOUT_S = 60.0      # a keepalive=0 client stalled in the middle of a packet is closed
STOP_HANDLER_TIMEOUT_S = 2.0
ACCOUNTS_POLL_S = 1.0        # how often the password file's stamp is checked (accounts.py)
EXPIRY_SWEEP_MIN_S = 0.25    # session expiry sweeps: a quarter of the shortest expiry, within these
EXPIRY_SWEEP_MAX_S = 60.0

BAD_USERNAME_PASSWORD = 0x04
NOT_AUTHORIZED = 0x05
SUBACK_FAILURE = 0x80


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


def user_principal(username: str) -> str:
    return f"user:{username}"


def anonymous_principal(listener: str) -> str:
    return f"anonymous@{listener}"


class GatewayBroker(Broker):
    """amqtt's broker with the gateway's auth, ACLs, sessions and durable state.

    ``reserved_client_id`` is the gateway's own client id: only ``gateway_usernames``
    (the per-process internal account, and ``broker.username`` when the daemon logs in
    with a configured account) may use it, and its session is never capped.
    """

    def __init__(self, config: BrokerConfig, listeners: dict[str, ListenerSection],
                 passwords: PasswordFile, internal: InternalCredentials, *,
                 roles: dict[str, AclRule], prefix: str, store: StateStore | None,
                 max_queued: int, metrics: BrokerMetrics | None = None,
                 reserved_client_id: str | None = None, gateway_usernames: tuple[str, ...] = (),
                 max_retained: int = MAX_RETAINED_MESSAGES, max_retained_bytes: int = MAX_RETAINED_BYTES,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, packet_timeout_s: float = PACKET_TIMEOUT_S,
                 limits: LimitPolicy | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._gw_listeners = listeners
        self._passwords = passwords
        self._internal = internal
        self._roles = roles
        self._prefix = prefix
        self._store = store
        self._max_queued = max_queued
        # Set by route() when a connected subscriber's queue is half full; the reader that
        # routed the message yields once so that the subscriber's sender runs (handler.py).
        self.backlogged = False
        self.metrics = metrics or BrokerMetrics()
        self.limits = limits or LimitPolicy()
        self.limit_log = LimitRecorder(self.metrics)
        self.retained_quota = RetainedQuota()
        self.connections = ConnectionCount()
        self._clients: dict[str, ClientState] = {}
        self._index: SubscriptionIndex[ClientState] = SubscriptionIndex()
        self._retained: RetainedStore[tuple[Message, int]] = RetainedStore(max_retained, max_retained_bytes)
        self._sys_retained: dict[str, Message] = {}   # $SYS/...: in memory only, not counted
        self._seq = itertools.count(1)
        self._connecting: set[WriterAdapter] = set()
        self.reserved_client_id = reserved_client_id
        self._gateway_principals = {user_principal(u) for u in (internal.username, *gateway_usernames) if u}
        self._connect_timeout_s = connect_timeout_s
        self._packet_timeout_s = packet_timeout_s
        self._denied_log = LogThrottle()
        self._drop_log = LogThrottle()
        self._retained_log = LogThrottle()
        self.started_mono = time.monotonic()

    # ================================================================== state
    def restore(self, loaded: LoadedState) -> None:
        """Retained messages and persistent sessions from SQLite (before ``start``)."""
        self._seq = itertools.count(loaded.next_seq)
        over_limit = 0
        for topic, (payload, qos, principal) in loaded.retained.items():
            size = _retained_size(topic, payload)
            gateway = principal is not None and principal in self._gateway_principals
            owner = None if gateway else principal   # stored before owners were recorded: no one's
            if self._retained.put(topic, (Message(topic, payload), qos), size, exempt=gateway):
                self.retained_quota.stored(topic, owner, size)
            else:
                over_limit += 1
                if self._store is not None:
                    self._store.clear_retained(topic)
        if over_limit:
            log.warning("retained messages over the retained store's limits were deleted at start",
                        deleted=over_limit, max_messages=self._retained.max_messages,
                        max_bytes=self._retained.max_bytes)
        bodies: dict[int, Message] = {}
        for stored in loaded.sessions.values():
            cs = self._new_client(stored.client_id, clean=False)
            cs.username, cs.role, cs.dropped = stored.username, stored.role, stored.dropped
            cs.owner = stored.owner or self._legacy_owner(stored.username)
            cs.acl = self._compile_acl(stored.role, stored.username)
            cs.limits = self._client_limits(stored.role, cs.owner)
            if stored.seen_at is not None:  # the gateway's clock on disk (gateway.clock), monotonic in memory
                cs.offline_since = time.monotonic() - max(0.0, clock.now() - stored.seen_at)
            for topic_filter, qos in stored.subscriptions.items():
                cs.subscriptions[topic_filter] = qos
                self._index.add(topic_filter, cs.client_id, cs, qos)
            cs.restore([(Outgoing(self._stored_body(bodies, m), m.qos, m.retain, m.seq), m.packet_id, m.state)
                        for m in stored.messages])
            cs.qos2_in = set(stored.qos2_in)
            self._clients[cs.client_id] = cs
        self._trim_sessions()
        if loaded.sessions or loaded.retained:
            log.info("broker state restored", sessions=len(loaded.sessions), retained=len(loaded.retained),
                     queued=sum(len(s.messages) for s in loaded.sessions.values()))

    def _trim_sessions(self) -> None:
        """Principals holding more persistent sessions than max_sessions_per_account (stored
        before the limit, or under a higher one) keep their most recently seen ones."""
        by_owner: dict[str | None, list[ClientState]] = {}
        for cs in self._clients.values():
            if not cs.clean:
                by_owner.setdefault(cs.owner, []).append(cs)
        for owner, held in by_owner.items():
            cap = held[0].limits.max_sessions_per_account
            if not cap or len(held) <= cap:
                continue
            held.sort(key=lambda cs: cs.offline_since)
            for cs in held[:len(held) - cap]:
                self.metrics.sessions_evicted += 1
                self._discard(cs)
            log.warning("persistent sessions over broker.limits.max_sessions_per_account forgotten at start "
                        "(the longest offline)", owner=owner, forgotten=len(held) - cap, kept=cap)

    @staticmethod
    def _stored_body(bodies: dict[int, Message], m: Any) -> Message:
        """One Message per stored body, however many sessions queue it (and its references)."""
        if m.body_id is None:
            return Message(m.topic, m.payload)
        msg = bodies.get(m.body_id)
        if msg is None:
            msg = bodies[m.body_id] = Message(m.topic, m.payload)
            msg.body_id, msg.shared = m.body_id, True
        msg.refs += 1
        return msg

    def _legacy_owner(self, username: str | None) -> str:
        """The owner of a session stored before sessions had owners: its username, else
        anonymous on the (first) listener that lets anonymous clients in."""
        if username:
            return user_principal(username)
        anonymous = [s.name for s in self._gw_listeners.values() if s.allow_anonymous]
        return anonymous_principal(anonymous[0] if anonymous else "")

    def _new_client(self, client_id: str, clean: bool) -> ClientState:
        gateway = client_id == self.reserved_client_id
        return ClientState(client_id, clean, store=self._store, metrics=self.metrics, seq=self._seq,
                           max_queued=self._max_queued, capped=not gateway,
                           max_inflight=GATEWAY_MAX_INFLIGHT if gateway else MAX_INFLIGHT,
                           drop_log=self._drop_log, limit_log=self.limit_log, connections=self.connections)

    def _client_limits(self, role: str | None, owner: str | None) -> ClientLimits:
        return self.limits.for_role(role, gateway=owner in self._gateway_principals)

    def _compile_acl(self, role: str | None, username: str | None) -> ClientAcl:
        rule = self._roles.get(role or "") or AclRule()  # a role that vanished from the config: nothing
        return ClientAcl(rule, self._prefix, username)

    def _discard(self, cs: ClientState) -> None:
        """Forget a session: its subscriptions, queue and (if persistent) its rows."""
        cs.release_all()
        for topic_filter in cs.subscriptions:
            self._index.remove(topic_filter, cs.client_id)
        cs.subscriptions.clear()
        cs.pending.clear()
        cs.pending_bytes = 0
        cs.inflight.clear()
        if self._clients.get(cs.client_id) is cs:
            del self._clients[cs.client_id]
        if not cs.clean and self._store is not None:
            self._store.forget_session(cs.client_id)

    def snapshot(self) -> dict[str, int]:
        """Counters and gauges (see :class:`BrokerMetrics`)."""
        store = self._store
        return self.metrics.snapshot(
            sessions=len(self._clients),
            sessions_persistent=sum(1 for cs in self._clients.values() if not cs.clean),
            subscriptions=len(self._index),
            retained=len(self._retained),
            retained_bytes=self._retained.bytes,
            queued=sum(len(cs.pending) for cs in self._clients.values()),
            queued_bytes=sum(cs.pending_bytes for cs in self._clients.values()),
            inflight=sum(len(cs.inflight) for cs in self._clients.values()),
            persist_backlog=store.backlog if store is not None else 0,
            persist_failing=int(store.failing) if store is not None else 0,
            uptime_s=int(time.monotonic() - self.started_mono),
        )

    # ================================================================== TLS
    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:  # type: ignore[override]
        """TLS 1.2+; client certificates required where the listener says so."""
        ctx = Broker._create_ssl_context(listener)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        section = self._listener_section(listener)
        if section is not None and section.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif section is not None and section.cafile is None:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _listener_section(self, listener: ListenerConfig) -> ListenerSection | None:
        for name, cfg in self.listeners_config.items():
            if cfg is listener:
                return self._gw_listeners.get(name)
        return None

    # ================================================================== connections
    async def _session_monitor(self) -> None:
        """amqtt's monitor deletes sessions it thinks anonymous; session lifetime is ours."""
        return None

    async def _initialize_client_session(self, reader: ReaderAdapter, writer: WriterAdapter,
                                         remote_address: str, remote_port: int
                                         ) -> tuple[GatewayProtocolHandler, Session]:  # type: ignore[override]
        """Read and check the CONNECT only; no session is touched before authentication.

        amqtt would parse any first packet as a CONNECT and wait for as many bytes as
        its length claims; here anything but CONNECT closes the connection at once
        [MQTT-3.1.0-1], and a CONNECT must be complete within ``CONNECT_TIMEOUT_S``.
        """
        if len(self._connecting) >= self.limits.max_connections:
            self.limit_log.hit(Limit.CONNECTIONS, None, remote=f"{remote_address}:{remote_port}",
                               connecting=len(self._connecting))
            await _close_writer(writer)
            raise AMQTTError("too many connections waiting for their CONNECT")
        self._connecting.add(writer)
        try:
            first = await asyncio.wait_for(reader.read(1), self._connect_timeout_s)
            if first != b"\x10":
                raise AMQTTError(f"first packet is not CONNECT (byte {first!r})")
            # The sender is not known yet: its CONNECT is bounded before a byte of the body is read.
            header = first + await asyncio.wait_for(self._connect_length(reader), self._connect_timeout_s)
            handler, session = await asyncio.wait_for(
                GatewayProtocolHandler.init_from_connect(_Prefixed(header, reader), writer, self.plugins_manager),
                self._connect_timeout_s)
        except (TimeoutError, AMQTTError, MQTTError, NoDataError, Exception) as exc:
            await _close_writer(writer)
            if isinstance(exc, asyncio.IncompleteReadError):  # closed before a byte: port probes
                raise AMQTTError("connection closed before CONNECT") from None
            if not isinstance(exc, (MQTTError, NoDataError)):
                self.metrics.protocol_errors += 1
            log.info("connection refused before CONNECT completed", remote=f"{remote_address}:{remote_port}",
                     error=str(exc) or type(exc).__name__)
            raise AMQTTError(str(exc)) from None
        finally:
            self._connecting.discard(writer)
        assert isinstance(handler, GatewayProtocolHandler)
        return handler, session

    async def _connect_length(self, reader: ReaderAdapter) -> bytes:
        """The CONNECT's "remaining length" bytes; over ``MAX_CONNECT_PACKET`` is refused."""
        raw = b""
        length, multiplier = 0, 1
        for _ in range(4):
            byte = await reader.read(1)
            if not byte:
                raise asyncio.IncompleteReadError(raw, None)
            raw += byte
            length += (byte[0] & 0x7F) * multiplier
            if not byte[0] & 0x80:
                break
            multiplier *= 128
        else:
            raise AMQTTError("CONNECT remaining length over 4 bytes")
        if length > MAX_CONNECT_PACKET:
            self.limit_log.hit(Limit.PACKET_SIZE, None, packet="CONNECT", packet_bytes=length,
                               max_connect_packet=MAX_CONNECT_PACKET)
            raise AMQTTError(f"CONNECT of {length} bytes (at most {MAX_CONNECT_PACKET})")
        return raw

    def packet_too_large(self, cs: ClientState, length: int) -> None:
        """The reader saw a fixed header over the client's max_packet_size: counted, logged;
        the reader closes the connection without reading the body."""
        self.limit_log.hit(Limit.PACKET_SIZE, cs.client_id, username=cs.username, role=cs.role,
                           packet_bytes=length, max_packet_size=cs.limits.max_packet_size)

    async def rate_pause(self, cs: ClientState, pause: float) -> None:
        """A client over its publish rate: its connection is not read for ``pause`` seconds
        (TCP pushes back on it; nothing it sent is lost)."""
        self.limit_log.hit(Limit.RATE, cs.client_id, username=cs.username, role=cs.role,
                           max_publish_rate=cs.limits.max_publish_rate,
                           max_publish_bytes_rate=cs.limits.max_publish_bytes_rate)
        await asyncio.sleep(pause)

    async def _authorize(self, session: Session, section: ListenerSection | None) -> tuple[str | None, int]:
        """(role, 0) or (None, CONNACK return code). Passwords are never logged."""
        username, password = session.username, session.password
        role: str | None
        if username is not None:
            if username == self._internal.username:
                ok = secrets.compare_digest((password or "").encode(), self._internal.password.encode())
                return ("admin", 0) if ok else (None, BAD_USERNAME_PASSWORD)
            try:
                # argon2 takes tens of milliseconds of CPU: never on the event loop.
                account = await asyncio.to_thread(self._passwords.verify, username, password or "")
            except PasswordFileError as exc:
                log.error("password file unreadable", error=str(exc))
                return None, NOT_AUTHORIZED
            if account is None:
                return None, BAD_USERNAME_PASSWORD
            session.homepot_hash = account.hash  # type: ignore[attr-defined]  # accounts.py: changed → closed
            role = account.role
        elif section is not None and section.allow_anonymous:
            role = section.anonymous_role
        else:
            return None, NOT_AUTHORIZED
        if role not in self._roles:
            log.warning("account has a role the configuration does not define", username=username, role=role)
            return None, NOT_AUTHORIZED
        return role, 0

    async def _handle_client_session(self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
                                     handler: Any, server: Server, listener_name: str) -> None:
        """CONNECT accepted by amqtt's parser → authenticate, resume or create, serve, clean up."""
        assert isinstance(handler, GatewayProtocolHandler)
        session = client_session
        section = self._gw_listeners.get(listener_name)
        try:
            role, code = await self._authorize(session, section)
            if role is None:
                self.metrics.auth_failures += 1
                log.info("mqtt connection refused", client_id=session.client_id, username=session.username,
                         listener=section.name if section else listener_name, return_code=code)
                try:
                    writer.write(encode_connack(False, code))
                    await writer.drain()
                finally:
                    await _close_writer(writer)  # [MQTT-3.2.2-5]
                return
            session.homepot_role = role  # type: ignore[attr-defined]
            listener = section.name if section else listener_name
            owner = user_principal(session.username) if session.username is not None else anonymous_principal(listener)
            refusal = self._ownership_refusal(session.client_id or "", owner)
            if refusal is not None:
                # Nothing was touched: the session, its queue and its live connection stay as they are.
                self.metrics.sessions_refused += 1
                log.warning("mqtt connection refused: " + refusal, client_id=session.client_id,
                            username=session.username, role=role, listener=listener, return_code=NOT_AUTHORIZED)
                try:
                    writer.write(encode_connack(False, NOT_AUTHORIZED))
                    await writer.drain()
                finally:
                    await _close_writer(writer)
                return
            refused = self._quota_refusal(session, role, owner)
            if refused is not None:
                self.limit_log.hit(refused, session.client_id, username=session.username, role=role,
                                   listener=listener, return_code=SERVER_UNAVAILABLE)
                try:
                    writer.write(encode_connack(False, SERVER_UNAVAILABLE))
                    await writer.drain()
                finally:
                    await _close_writer(writer)
                return
            cs, present = self._open_session(session, role, owner)
            if session.keep_alive > 0:
                # amqtt's reader times out after this many seconds without a packet.
                session.keep_alive = session.keep_alive * 1.5  # type: ignore[assignment]
            # Every read inside a packet is bounded too (1.5 × keepalive, or packet_timeout_s).
            guarded = StallGuard(reader, session.keep_alive if session.keep_alive > 0 else self._packet_timeout_s,
                                 handler.handle_read_timeout)
            handler.attach(session, guarded, writer)
            handler.gw, handler.client = self, cs
            session.transitions.connect()
            self._sessions[cs.client_id] = (session, handler)
            self.metrics.clients_connected += 1
            self.metrics.connections_total += 1
            await handler.send_bytes(encode_connack(present, 0))
            cs.attach(handler)          # resends in-flight messages, then drains the queue
            await handler.start()       # amqtt's reader loop
            log.debug("client connected", client_id=cs.client_id, username=cs.username, role=role,
                      clean_session=cs.clean, session_present=present)
            await self._client_message_loop(session, handler)
        except Exception as exc:  # one client's trouble must never take the broker down
            log.warning("client session failed", client_id=session.client_id, error=repr(exc))
        finally:
            if handler.client is not None:
                await self._connection_closed(handler, abnormal=True)

    def _ownership_refusal(self, client_id: str, owner: str) -> str | None:
        """Why ``owner`` may not use ``client_id`` (None: it may).

        A client id that belongs to a session (persistent, or clean and connected) is
        its owner's: anyone else is refused, whatever their CleanSession flag, since
        CleanSession=1 would wipe the owner's queue and a takeover would kick the owner
        off. The gateway's own client id is reserved for the gateway's account.
        """
        if client_id and client_id == self.reserved_client_id and owner not in self._gateway_principals:
            return "client id is reserved for the gateway's own client"
        old = self._clients.get(client_id)
        if old is not None and old.owner is not None and old.owner != owner:
            return "client id belongs to a session of another principal"
        return None

    def _quota_refusal(self, session: Session, role: str, owner: str) -> Limit | None:
        """max_connections (total and per role) and max_sessions_per_account for a CONNECT that
        passed authentication and ownership; None: admitted. Nothing is touched before the
        verdict, except that a principal at its session limit loses its longest-offline
        session(s) to a new one (only when one is offline; otherwise the CONNECT is refused)."""
        limits = self._client_limits(role, owner)
        client_id = session.client_id or ""
        old = self._clients.get(client_id)
        if limits.max_connections and not (old is not None and old.handler is not None):  # a takeover adds none
            if self.connections.total >= self.limits.max_connections:
                return Limit.CONNECTIONS
            if self.connections.by_role.get(role, 0) >= limits.max_connections:
                return Limit.CONNECTIONS
        cap = limits.max_sessions_per_account
        if cap and not session.clean_session and (old is None or old.clean):
            held = [cs for cs in self._clients.values() if not cs.clean and cs.owner == owner]
            if len(held) >= cap:
                offline = sorted((cs for cs in held if cs.handler is None), key=lambda cs: cs.offline_since)
                excess = len(held) - cap + 1
                if len(offline) < excess:
                    return Limit.SESSIONS
                for cs in offline[:excess]:
                    self.metrics.sessions_evicted += 1
                    log.info("persistent session forgotten for a newer one of its principal "
                             "(broker.limits.max_sessions_per_account)", client_id=cs.client_id, owner=owner,
                             new_client_id=client_id, max_sessions_per_account=cap, queued=len(cs.pending))
                    self._discard(cs)
        return None

    # ------------------------------------------------------------------ accounts (accounts.py)
    def clients(self) -> list[ClientState]:
        """Every session, connected or persistent offline."""
        return list(self._clients.values())

    def is_gateway(self, cs: ClientState) -> bool:
        return cs.owner in self._gateway_principals

    def knows_role(self, role: str) -> bool:
        return role in self._roles

    def disconnect(self, cs: ClientState) -> None:
        """Close a client's connection now (its account changed), without its will (the
        account has no rights left to publish one); a clean session ends with it."""
        handler = cs.handler
        if handler is None:
            return
        handler.client = None   # _connection_closed then does nothing more for it
        handler.no_will = True
        cs.detach()
        if self._sessions.get(cs.client_id, (None, None))[1] is handler:
            del self._sessions[cs.client_id]
        self.metrics.clients_connected -= 1
        handler.abort()
        if cs.clean:
            self._discard(cs)

    def forget(self, cs: ClientState) -> None:
        """Forget a session with its subscriptions and queue (its account is gone)."""
        self.disconnect(cs)
        self._discard(cs)

    def change_role(self, cs: ClientState, role: str) -> None:
        """The session's account has a new role: its ACL and limits, now."""
        cs.role = role
        cs.acl = self._compile_acl(role, cs.username)
        cs.limits = self._client_limits(role, cs.owner)
        if cs.handler is not None:
            cs.rate = (RateBucket(cs.limits.max_publish_rate, cs.limits.max_publish_bytes_rate)
                       if cs.limits.rate_limited else None)
            cs.recount()
        if not cs.clean and self._store is not None:
            self._store.session(cs.client_id, cs.username, role, cs.owner)

    def expire_sessions(self) -> int:
        """Forget persistent sessions offline longer than their role's session_expiry_s (also
        MQTT 3.1.1 ones, like Mosquitto's persistent_client_expiration); the number forgotten."""
        now = time.monotonic()
        expired = [cs for cs in self._clients.values()
                   if not cs.clean and cs.handler is None and cs.limits.session_expiry_s
                   and now - cs.offline_since >= cs.limits.session_expiry_s]
        for cs in expired:
            self.metrics.sessions_expired += 1
            log.info("persistent session expired (broker.limits.session_expiry_s)", client_id=cs.client_id,
                     owner=cs.owner, offline_s=round(now - cs.offline_since), queued=len(cs.pending))
            self._discard(cs)
        return len(expired)

    def _open_session(self, session: Session, role: str, owner: str) -> tuple[ClientState, bool]:
        """Take over a live connection, then resume (CleanSession=0) or start afresh."""
        client_id = session.client_id or ""
        old = self._clients.get(client_id)
        if old is not None and old.handler is not None:
            # [MQTT-3.1.4-2] the existing connection is closed. Its will is not sent: the
            # same client is back, and a late "offline" will would race its new state.
            old_handler = old.handler
            old_handler.client = None
            old.detach()
            self._sessions.pop(client_id, None)
            self.metrics.clients_connected -= 1
            old_handler.abort()
            log.info("client id taken over by a new connection", client_id=client_id)
        present = False
        if session.clean_session:
            if old is not None:
                self._discard(old)  # [MQTT-3.1.2-6]
            cs = self._new_client(client_id, clean=True)
        elif old is not None and not old.clean:
            cs, present = old, True  # [MQTT-3.1.2-4], [MQTT-3.2.2-2]
        else:
            if old is not None:
                self._discard(old)
            cs = self._new_client(client_id, clean=False)
        cs.username, cs.role, cs.owner = session.username, role, owner
        cs.acl = self._compile_acl(role, session.username)
        cs.limits = self._client_limits(role, owner)
        cs.account_hash = getattr(session, "homepot_hash", None)
        self._clients[client_id] = cs
        if not cs.clean and self._store is not None:
            self._store.session(client_id, session.username, role, owner)
        return cs, present

    async def _handle_disconnect(self, client_session: Session, handler: Any,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        result = disconnect_waiter.result()
        await self._connection_closed(handler, abnormal=not isinstance(result, DisconnectPacket))

    async def _connection_closed(self, handler: GatewayProtocolHandler, abnormal: bool) -> None:
        """The one place a connection ends: will, session state, metrics, socket."""
        cs = handler.client
        handler.client = None
        if isinstance(handler.reader, StallGuard):
            handler.reader.cancel()
        if cs is not None and cs.handler is handler:
            session = handler.session
            if abnormal and session is not None and session.will_flag and not handler.no_will:
                self._publish_will(cs, session)  # [MQTT-3.1.2-8]; not after DISCONNECT [MQTT-3.14.4-3]
            cs.detach()
            if self._sessions.get(cs.client_id, (None, None))[1] is handler:
                del self._sessions[cs.client_id]
            self.metrics.clients_connected -= 1
            if session is not None:
                session.transitions.disconnect()
            if cs.clean:
                self._discard(cs)
            log.debug("client disconnected", client_id=cs.client_id, abnormal=abnormal)
        await self._stop_handler(handler)

    async def _stop_handler(self, handler: Any) -> None:
        try:
            await asyncio.wait_for(handler.stop(), STOP_HANDLER_TIMEOUT_S)
        except Exception:  # a half-open socket would never finish closing politely
            abort_transport(handler.writer)

    def _publish_will(self, cs: ClientState, session: Session) -> None:
        topic = session.will_topic or ""
        qos = session.will_qos or 0
        if not valid_topic_name(topic) or qos > 2:
            return
        if cs.acl is not None and not cs.acl.may_publish(topic):
            self.metrics.denied_publish += 1
            log.info("will denied by ACL", client_id=cs.client_id, topic=topic)
            return
        self.metrics.wills_published += 1
        self.route(topic, bytes(session.will_message or b""), qos, bool(session.will_retain), publisher=cs)

    # ================================================================== publish
    def route(self, topic: str, payload: bytes, qos: int, retain: bool,
              publisher: ClientState | None = None) -> bool:
        """Store (retain) and fan out one message; True when it queued durable writes.

        A retained message counts against its ``publisher``'s principal (retained quota);
        the gateway's own retained messages count against no one and pass the store's limits,
        so no client can crowd out job, alarm and gateway status."""
        durable = False
        msg: Message | None = None
        if retain:
            store = self._store
            if payload:
                msg = Message(topic, payload)
                size = _retained_size(topic, payload)
                owner = self._retained_owner(publisher)
                if publisher is not None and not self.retained_quota.admits(topic, owner, size, publisher.limits):
                    count, nbytes = self.retained_quota.usage(owner or "")
                    self.limit_log.hit(Limit.RETAINED, publisher.client_id, username=publisher.username,
                                       topic=topic, retained_topics=count, retained_bytes=nbytes,
                                       max_retained_per_principal=publisher.limits.max_retained_per_principal,
                                       max_retained_bytes_per_principal=publisher.limits.max_retained_bytes_per_principal)
                    durable = self._clear_retained(topic) or durable
                elif self._retained.put(topic, (msg, qos), size, exempt=owner is None):  # [MQTT-3.3.1-5/7]
                    self.retained_quota.stored(topic, owner, size)
                    if store is not None:
                        store.retain(topic, payload, qos, publisher.owner if publisher is not None else None)
                        durable = True
                else:
                    durable = self._refuse_retained(topic) or durable
            else:
                durable = self._clear_retained(topic) or durable  # [MQTT-3.3.1-10/11]
        targets = self._index.match(topic)
        if not targets:
            return durable
        if msg is None:
            msg = Message(topic, payload)
        msg.shared = len(targets) > 1
        metrics = self.metrics
        for cs, sub_qos in targets.values():
            acl = cs.acl
            if acl is not None and not acl.allow_all and not acl.may_receive(topic):
                metrics.denied_receive += 1
                continue
            # Live messages go out with RETAIN=0 [MQTT-3.3.1-9] at min(pub, sub) [MQTT-3.8.4-6].
            if cs.enqueue(msg, qos if qos < sub_qos else sub_qos, False):
                durable = True
            if cs.backlogged:
                self.backlogged = True  # the reader yields before routing the next message
        return durable

    def _refuse_retained(self, topic: str) -> bool:
        """The retained store is at a limit: not kept, counted, logged (rate-limited). A stale
        message it would have replaced is cleared. True when that queued a durable write."""
        self.metrics.retained_refused += 1
        suppressed = self._retained_log("retained")
        if suppressed is not None:
            log.warning("retained message not kept: the retained store is full (delivered to current "
                        "subscribers only)", topic=topic, retained=len(self._retained),
                        retained_bytes=self._retained.bytes, max_messages=self._retained.max_messages,
                        max_bytes=self._retained.max_bytes, suppressed=suppressed)
        return self._clear_retained(topic)

    def _clear_retained(self, topic: str) -> bool:
        """Forget the retained message of ``topic``; True when that queued a durable write."""
        self.retained_quota.removed(topic)
        if self._retained.remove(topic) and self._store is not None:
            self._store.clear_retained(topic)
            return True
        return False

    def retained_verdict(self, publisher: ClientState, topic: str, payload: bytes) -> LimitVerdict | None:
        """Would :meth:`route` refuse to keep this retained message (the publisher's retained
        quota)? For a wire that can say so (MQTT 5: PUBACK 0x97); the message is routed either way."""
        owner = self._retained_owner(publisher)
        if not payload or self.retained_quota.admits(topic, owner, _retained_size(topic, payload), publisher.limits):
            return None
        return Limit.RETAINED.verdict

    def _retained_owner(self, publisher: ClientState | None) -> str | None:
        """Whom a retained message counts against: None for the gateway's own client (and
        for messages from inside the broker)."""
        if publisher is None or publisher.owner in self._gateway_principals:
            return None
        return publisher.owner

    def _log_denied_publish(self, cs: ClientState, topic: str) -> None:
        suppressed = self._denied_log((cs.client_id, topic))
        if suppressed is None:
            return
        acl = cs.acl
        log.warning(
            "publish denied by ACL and dropped: the client's role may not publish to this topic; MQTT 3.1.1 has "
            "no negative PUBACK, so the client was acknowledged and cannot tell (this line repeats at most "
            "once a minute per client and topic)",
            client_id=cs.client_id, username=cs.username, role=cs.role, topic=topic,
            role_may_publish=acl.publish_filters if acl is not None else [],
            suppressed_since_last=suppressed)

    async def on_publish(self, handler: GatewayProtocolHandler, cs: ClientState, packet: PublishPacket) -> None:
        """A PUBLISH decoded by amqtt (the handler's own reader decodes them itself)."""
        header = packet.variable_header
        ack = self.accept_publish(handler, cs, header.topic_name if header is not None else "",
                                  header.packet_id if header is not None else None, packet.qos,
                                  bytes(packet.data or b""), bool(packet.retain_flag))
        if ack is not None:
            kind, packet_id, durable = ack
            await self.acknowledge_publish(handler, kind, packet_id, self.commit_barrier(durable))

    def accept_publish(self, handler: GatewayProtocolHandler, cs: ClientState, topic: str, packet_id: int | None,
                       qos: int, payload: bytes, retain: bool) -> tuple[int, int, bool] | None:
        """Everything a PUBLISH does before its acknowledgement, without awaiting: checks,
        QoS 2 bookkeeping, ACL, routing (and queueing the durable writes it needs).

        Returns ``(kind, packet_id, durable)``: PUBACK or PUBREC, and whether the ack must
        wait for the commit (:meth:`commit_barrier`, :meth:`acknowledge_publish`), or None
        when no ack is due.
        Synchronous so that the reader can route in arrival order without a task per packet.
        """
        metrics = self.metrics
        metrics.messages_in += 1
        metrics.bytes_in += len(payload)
        if qos > 2 or (qos and packet_id is None) or not valid_topic_name(topic):
            # [MQTT-3.3.1-4], [MQTT-4.7.3-1]: a protocol violation closes the connection.
            metrics.protocol_errors += 1
            log.info("malformed PUBLISH; closing connection", client_id=cs.client_id, qos=qos)
            handler.abort()
            return None
        store = cs.store
        if qos == 2:
            assert packet_id is not None
            if packet_id in cs.qos2_in:
                # Resent: not routed again; its first PUBREC may have been held back by a
                # failed write, so the same barrier applies.
                return PUBREC, packet_id, True
            cs.qos2_in.add(packet_id)
            if store is not None:
                store.qos2_received(cs.client_id, packet_id)
        acl = cs.acl
        durable = False
        if topic.startswith("$SYS") or (acl is not None and not acl.may_publish(topic)):
            # Dropped and counted; still acknowledged: 3.1.1 has no negative PUBACK [MQTT-3.3.5-2].
            metrics.denied_publish += 1
            self._log_denied_publish(cs, topic)
        else:
            durable = self.route(topic, payload, qos, retain, publisher=cs)
        if qos == 0:
            return None
        assert packet_id is not None
        return (PUBACK if qos == 1 else PUBREC), packet_id, durable or (qos == 2 and store is not None)

    def commit_barrier(self, needed: bool) -> asyncio.Future[None] | None:
        """The commit an acknowledgement must wait for (None: nothing to wait for).

        Taken when the message is routed, not when the acknowledging task first runs: a
        barrier taken later would miss the group commit that already carries the message
        and wait for the next one."""
        if not needed or self._store is None:
            return None
        return self._store.barrier()

    def shared_commit_barrier(self) -> asyncio.Future[None] | None:
        """The commit the acknowledgement of a just-routed PUBLISH waits for, shared by every
        PUBLISH routed before that commit begins (:meth:`StateStore.shared_barrier`); None
        without a store. For done-callbacks only, never awaited."""
        if self._store is None:
            return None
        return self._store.shared_barrier()

    async def acknowledge_publish(self, handler: GatewayProtocolHandler, kind: int, packet_id: int,
                                  barrier: asyncio.Future[None] | None) -> None:
        """Send the PUBACK/PUBREC once ``barrier`` (see :meth:`commit_barrier`) is committed.
        If the commit fails, no acknowledgement: the connection is closed so the client resends."""
        if barrier is not None:
            try:
                await barrier
            except StateNotStored:
                handler.close_unstored()
                return
        await handler.send_bytes(encode_ack(kind, packet_id))

    async def _durable(self, handler: GatewayProtocolHandler, needed: bool) -> bool:
        """Wait until what an acknowledgement depends on is committed. False: it could not
        be; the connection is closed (no acknowledgement, no will) so the client resends."""
        if not needed or self._store is None:
            return True
        try:
            await self._store.barrier()
        except StateNotStored:
            handler.close_unstored()
            return False
        return True

    async def on_pubrel(self, handler: GatewayProtocolHandler, cs: ClientState, packet_id: int) -> None:
        needed = False
        if packet_id in cs.qos2_in:
            cs.qos2_in.discard(packet_id)
            store = cs.store
            if store is not None:
                store.qos2_released(cs.client_id, packet_id)
                needed = True
        # PUBCOMP only once the release is on disk: otherwise a restart would remember the
        # id as unreleased and swallow the client's next message with the same id.
        if await self._durable(handler, needed):
            await handler.send_bytes(encode_ack(PUBCOMP, packet_id))  # always [MQTT-4.3.3-2]

    async def internal_message_broadcast(self, topic: str, data: bytes, qos: int | None = None) -> None:
        """amqtt's plugin API, routed through the gateway's path."""
        self.route(topic, bytes(data), qos or 0, False)

    # ================================================================== subscribe
    async def _handle_subscription(self, client_session: Session, handler: Any,
                                   subscribe_waiter: asyncio.Future[Any]) -> None:
        subscription = subscribe_waiter.result()
        cs: ClientState | None = handler.client
        if cs is None:
            return
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        store = cs.store
        for topic_filter, qos in subscription.topics:
            if qos not in (0, 1, 2) or not valid_topic_filter(topic_filter):
                codes.append(SUBACK_FAILURE)
                continue
            if cs.acl is not None and not cs.acl.may_subscribe(topic_filter):
                self.metrics.denied_subscribe += 1
                log.info("subscribe denied by ACL", client_id=cs.client_id, username=cs.username,
                         role=cs.role, filter=topic_filter)
                codes.append(SUBACK_FAILURE)
                continue
            cs.subscriptions[topic_filter] = qos  # an identical filter replaces the old one [MQTT-3.8.4-3]
            self._index.add(topic_filter, cs.client_id, cs, qos)
            if store is not None:
                store.subscribe(cs.client_id, topic_filter, qos)
            codes.append(qos)
            granted.append((topic_filter, qos))
        if not await self._durable(handler, store is not None and bool(granted)):
            return
        await handler.mqtt_acknowledge_subscription(subscription.packet_id, codes)
        for topic_filter, qos in granted:
            self._send_retained(cs, topic_filter, qos)

    def _send_retained(self, cs: ClientState, topic_filter: str, qos: int) -> None:
        """Retained messages for one new subscription of one client [MQTT-3.3.1-6/8]; the
        trie walks only what the filter can match."""
        acl = cs.acl
        for topic, (msg, retained_qos) in self._retained.match(topic_filter):
            if acl is not None and not acl.may_receive(topic):
                self.metrics.denied_receive += 1
                continue
            cs.enqueue(msg, min(qos, retained_qos), True)
        if topic_filter.startswith("$"):  # only a filter naming '$SYS' can match it [MQTT-4.7.2-1]
            for topic, msg in self._sys_retained.items():
                if matches(topic, topic_filter) and (acl is None or acl.may_receive(topic)):
                    cs.enqueue(msg, 0, True)

    def publish_sys(self, topic: str, payload: bytes) -> None:
        """A ``$SYS`` message from inside the broker: retained in memory (never on disk, not
        in the retained count), QoS 0, to current subscribers whose role may read it."""
        msg = Message(topic, payload)
        self._sys_retained[topic] = msg
        for cs, _ in self._index.match(topic).values():
            acl = cs.acl
            if acl is not None and not acl.allow_all and not acl.may_receive(topic):
                continue
            cs.enqueue(msg, 0, False)  # live forward: RETAIN=0 [MQTT-3.3.1-9]

    async def _handle_unsubscription(self, client_session: Session, handler: Any,
                                     unsubscribe_waiter: asyncio.Future[Any]) -> None:
        unsubscription = unsubscribe_waiter.result()
        cs: ClientState | None = handler.client
        if cs is None:
            return
        store = cs.store
        for topic_filter in unsubscription.topics:
            if cs.subscriptions.pop(topic_filter, None) is not None:
                self._index.remove(topic_filter, cs.client_id)
                if store is not None:
                    store.unsubscribe(cs.client_id, topic_filter)
        if not await self._durable(handler, store is not None):
            return
        await handler.mqtt_acknowledge_unsubscription(unsubscription.packet_id)

    # ================================================================== shutdown
    async def shutdown(self) -> None:
        """Close listeners and connections; persistent sessions stay in SQLite."""
        log.debug("embedded broker shutting down")
        for server in self._servers.values():
            await server.close_instance()
        for writer in list(self._connecting):
            abort_transport(writer)
        for cs in list(self._clients.values()):
            handler = cs.handler
            if handler is not None:
                handler.client = None
                cs.detach()
                self.metrics.clients_connected -= 1
                await self._stop_handler(handler)
            if cs.clean:
                self._discard(cs)
        self._sessions.clear()
        if self._store is not None:
            try:
                await self._store.flush()
            except StateNotStored:
                pass  # StateStore.close says what could not be written
        self.transitions.shutdown()
        await self._shutdown_broadcast_loop()
        if self._session_monitor_task:
            self._session_monitor_task.cancel()
            await asyncio.gather(self._session_monitor_task, return_exceptions=True)
        await self.plugins_manager.close()
        self.transitions.stopping_success()


def _retained_size(topic: str, payload: bytes) -> int:
    return len(topic.encode("utf-8", "surrogatepass")) + len(payload)


class _Prefixed(ReaderAdapter):
    """A reader that first returns bytes already consumed (the CONNECT's fixed header)."""

    def __init__(self, prefix: bytes, inner: ReaderAdapter):
        self._prefix = prefix
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        if self._prefix and n != 0:
            if n < 0:
                head, self._prefix = self._prefix, b""
                return head + await self._inner.read(n)
            head, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(head) == n:
                return head
            return head + await self._inner.read(n - len(head))
        return await self._inner.read(n)

    def feed_eof(self) -> None:
        self._inner.feed_eof()


async def _close_writer(writer: WriterAdapter) -> None:
    try:
        await asyncio.wait_for(writer.close(), 1.0)
    except Exception:
        abort_transport(writer)


# ====================================================================== configuration
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


def gateway_client_id(cfg: Config) -> str:
    """The gateway's own client id (``homepot-gateway-<site_id>``), reserved in the broker."""
    return f"homepot-gateway-{cfg.gateway.site_id}"


class EmbeddedBroker:
    """Lifecycle wrapper: ``async with EmbeddedBroker(cfg, creds, db):`` listens until exit.

    ``db`` is the daemon's open :class:`Database`; without one the broker opens
    ``cfg.db_path`` itself (in-process tests, the benchmark) and closes it on stop.
    ``reserved_client_id`` is the client id the daemon's own client uses (default
    :func:`gateway_client_id`). The keyword arguments after it are limits and intervals
    that are not configuration keys (tests shorten them; docs/broker.md documents them).
    """

    def __init__(self, cfg: Config, internal: InternalCredentials, db: Database | None = None, *,
                 reserved_client_id: str | None = None, sys_interval_s: float = SYS_INTERVAL_S,
                 max_retained: int = MAX_RETAINED_MESSAGES, max_retained_bytes: int = MAX_RETAINED_BYTES,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, packet_timeout_s: float = PACKET_TIMEOUT_S,
                 accounts_poll_s: float = ACCOUNTS_POLL_S):
        self._cfg = cfg
        self.internal = internal
        self.broker: GatewayBroker | None = None
        self._db = db
        self._own_db: Database | None = None
        self._store: StateStore | None = None
        self._sys: SysPublisher | None = None
        self._accounts: AccountWatcher | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.accounts_poll_s = accounts_poll_s
        self.reserved_client_id = reserved_client_id or gateway_client_id(cfg)
        self._options: dict[str, Any] = dict(
            max_retained=max_retained, max_retained_bytes=max_retained_bytes,
            connect_timeout_s=connect_timeout_s, packet_timeout_s=packet_timeout_s)
        self.sys_interval_s = sys_interval_s

    def metrics(self) -> dict[str, int]:
        """Counters and gauges (see :class:`BrokerMetrics` and ``GatewayBroker.snapshot``);
        the names are stable (Prometheus metrics and ``$SYS`` are built from them)."""
        if self.broker is None:
            return BrokerMetrics().snapshot()
        return self.broker.snapshot()

    snapshot = metrics

    def reload_passwords(self) -> int:
        """SIGHUP: re-read the password file now; the number of accounts (blocking file I/O)."""
        if self.broker is None:
            return 0
        return self.broker._passwords.reload()  # noqa: SLF001 - same module

    async def check_accounts(self) -> dict[str, int] | None:
        """SIGHUP, after :meth:`reload_passwords`: apply the accounts to connected clients now."""
        if self._accounts is None:
            return None
        return await self._accounts.check(force=True)

    async def start(self) -> None:
        roles = self._cfg.broker.roles()
        for section in self._cfg.broker.listeners:
            _check_tls(section)
            if section.allow_anonymous and section.anonymous_role not in roles:
                raise BrokerStartError(f"broker.listeners[{section.name}].anonymous_role: unknown role "
                                       f"{section.anonymous_role!r} (known: {', '.join(sorted(roles))})")
        db = self._db
        if db is None:
            self._cfg.data_dir.mkdir(parents=True, exist_ok=True)
            db = self._own_db = await Database(self._cfg.db_path).open()
        metrics = BrokerMetrics()

        def persist_error() -> None:
            metrics.persist_errors += 1

        store = self._store = StateStore(db, on_error=persist_error)
        try:
            loaded = await store.open()
        except Exception as exc:
            await self._close_db()
            raise BrokerStartError(f"broker: cannot read its state from {db.path}: {exc}") from None
        amqtt_cfg, by_name = build_amqtt_config(self._cfg)
        passwords = PasswordFile(Path(self._cfg.broker.auth.password_file))
        configured = (self._cfg.broker.username,) if self._cfg.broker.username else ()
        broker = GatewayBroker(amqtt_cfg, by_name, passwords, self.internal, roles=roles, prefix=self._cfg.prefix,
                               store=store, max_queued=self._cfg.broker.max_queued_messages, metrics=metrics,
                               reserved_client_id=self.reserved_client_id, gateway_usernames=configured,
                               limits=LimitPolicy(self._cfg.broker.limits), **self._options)
        try:
            compat.check_amqtt(broker)
        except compat.AmqttMismatch as exc:
            await store.close()
            await self._close_db()
            raise BrokerStartError(f"broker: {exc}") from None
        broker.restore(loaded)
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_drop_startup_traceback)
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps every start failure in BrokerError
            cause = exc.__cause__ or exc
            await store.close()
            await self._close_db()
            raise BrokerStartError(_describe_start_error(cause, self._cfg)) from None
        finally:
            amqtt_log.removeFilter(_drop_startup_traceback)
        self.broker = broker
        self._sys = SysPublisher(broker, self.sys_interval_s)
        self._sys.start()
        self._accounts = AccountWatcher(broker, passwords, self.accounts_poll_s)
        self._accounts.start()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop(broker, roles), name="broker-expiry")
        log.info("embedded broker listening",
                 listeners=[f"{s.name}={s.type}://{s.bind}" for s in self._cfg.broker.listeners])

    async def _expire_loop(self, broker: GatewayBroker, roles: dict[str, AclRule]) -> None:
        """Session expiry: a sweep every quarter of the shortest expiry (at most a minute)."""
        shortest = broker.limits.shortest_expiry(list(roles))
        if not shortest:
            return
        interval = min(EXPIRY_SWEEP_MAX_S, max(EXPIRY_SWEEP_MIN_S, shortest / 4))
        while True:
            broker.expire_sessions()
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        if self._expiry is not None:
            task, self._expiry = self._expiry, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._accounts is not None:
            watcher, self._accounts = self._accounts, None
            await watcher.stop()
        if self._sys is not None:
            sys_publisher, self._sys = self._sys, None
            await sys_publisher.stop()
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.shutdown()
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()
        await self._close_db()

    async def _close_db(self) -> None:
        if self._own_db is not None:
            db, self._own_db = self._own_db, None
            await db.close()

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
