"""The embedded MQTT broker: MQTT 3.1.1 and 5.0 on a wire the gateway owns.

The gateway's own core never calls into this object to move messages: it connects
to a listener as an ordinary MQTT client, exactly as in ``external`` mode.

:mod:`gateway.broker.wire` owns the listeners (TCP, TLS, websockets), the connections,
the packet codec and one module per packet flow; this module owns what outlives a
packet: sessions and their owners, subscriptions, retained messages, wills, routing.

- authentication happens before the client id touches any session, so a client
  with a bad password can neither take over nor wipe someone's session;
- sessions, subscriptions, retained messages and offline queues live in
  :mod:`gateway.broker.clients` and :mod:`gateway.broker.state` (SQLite), with
  delivered QoS = min(publish, subscription) [MQTT-3.8.4-6], RETAIN=1 only for
  retained messages sent because of a new subscription [MQTT-3.3.1-8/9] (or with 5.0's
  Retain As Published), retained messages only for the subscribing client's new filters
  [MQTT-3.3.1-6], an offline queue for every persistent session bounded by
  ``max_queued_messages``, and in-flight messages resent with DUP=1 [MQTT-4.4.0-1];
- a 5.0 session lives for its Session Expiry Interval after its connection ends; a
  will waits for its Will Delay Interval and is dropped if the client is back first;
- keepalive is enforced (1.5 × keepalive), also against a client stalled in the
  middle of a packet, and the will is published on every abnormal close [MQTT-3.1.2-24];
- per-role ACLs on publish, subscribe and delivery (retained and queued included);
- a session belongs to the principal that made it (a username, or "anonymous on
  listener X"): a CONNECT from anyone else with its client id is refused before
  anything is touched, and the gateway's own client id is reserved for the gateway's account;
- a denied publish is logged once per client and topic per minute, and counted;
- retained messages live in a bounded topic trie (:mod:`gateway.broker.retained`);
- ``$SYS/broker/...`` is published inside the broker (:mod:`gateway.broker.systopics`).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway import clock
from gateway.broker.accounts import AccountWatcher
from gateway.broker.acl import ClientAcl
from gateway.broker.clients import GATEWAY_MAX_INFLIGHT, MAX_INFLIGHT, ClientState, Message, Outgoing
from gateway.broker.limits import (MAX_CONNECT_PACKET, ClientLimits, ConnectionCount, Limit, LimitPolicy,
                                   LimitRecorder, LimitVerdict, RateBucket, RetainedQuota)
from gateway.broker.presence import Presence
from gateway.broker.logins import Logins, Verdict, source_of
from gateway.broker.matching import SubscriptionIndex, delivery_ids, matches, valid_topic_name
from gateway.broker.metrics import BrokerMetrics
from gateway.broker.passwords import PasswordFile, PasswordFileError
from gateway.broker.retained import MAX_RETAINED_BYTES, MAX_RETAINED_MESSAGES, RetainedStore
from gateway.broker.shared import SharedGroup
from gateway.broker.state import LoadedState, StateNotStored, StateStore
from gateway.broker.suboptions import NO_LOCAL, QOS_MASK, RETAIN_AS_PUBLISHED, sub_ids_of
from gateway.broker.systopics import SYS_INTERVAL_S, SysPublisher
from gateway.broker.throttle import LogThrottle
from gateway.broker.wire.codec import V5, Reason
from gateway.broker.wire.connection import Connection
from gateway.broker.wire.handle_connect import ConnectPacket, Will
from gateway.broker.wire.handle_subscribe import split_shared
from gateway.broker.wire.listeners import Listener, Writer
from gateway.config import AclRule, Config, ListenerSection
from gateway.storage import Database

log = structlog.get_logger(__name__)

INTERNAL_USERNAME = "homepot-gateway"
CONNECT_TIMEOUT_S = 10.0     # a connection that sends no CONNECT is closed [MQTT-3.1.0-1]
PACKET_TIMEOUT_S = 60.0      # a keepalive=0 client stalled in the middle of a packet is closed
SHUTDOWN_GRACE_S = 1.0       # connections get this long to take their DISCONNECT at shutdown
ACCOUNTS_POLL_S = 1.0        # how often the password file's stamp is checked (accounts.py)
EXPIRY_SWEEP_MIN_S = 0.25    # session expiry sweeps: a quarter of the shortest expiry, within these
EXPIRY_SWEEP_MAX_S = 60.0


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


def _wall(expires_at: float | None) -> float | None:
    """A monotonic deadline on the gateway's clock (gateway.clock), for the database: a restart
    resets the monotonic clock, the gateway's clock keeps its timeline."""
    return None if expires_at is None else clock.now() + (expires_at - time.monotonic())


def _monotonic(wall: float | None) -> float | None:
    return None if wall is None else time.monotonic() + (wall - clock.now())


class GatewayBroker:
    """Sessions, subscriptions, retained messages and routing of the embedded broker.

    ``reserved_client_id`` is the gateway's own client id: only ``gateway_usernames``
    (the per-process internal account, and ``broker.username`` when the daemon logs in
    with a configured account) may use it, and its session is never capped.
    """

    def __init__(self, listeners: list[ListenerSection], passwords: PasswordFile, internal: InternalCredentials, *,
                 roles: dict[str, AclRule], prefix: str, store: StateStore | None,
                 max_queued: int, metrics: BrokerMetrics | None = None,
                 reserved_client_id: str | None = None, gateway_usernames: tuple[str, ...] = (),
                 max_retained: int = MAX_RETAINED_MESSAGES, max_retained_bytes: int = MAX_RETAINED_BYTES,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, packet_timeout_s: float = PACKET_TIMEOUT_S,
                 limits: LimitPolicy | None = None):
        self._sections = listeners
        self._listeners: list[Listener] = []
        self._passwords = passwords
        self.logins = Logins(passwords)   # argon2 once per good password; guesses bounded
        self._internal = internal
        self._roles = roles
        self._prefix = prefix
        self._store = store
        self._max_queued = max_queued
        # Set by route() when a connected subscriber's queue is half full; the reader that
        # routed the message yields once so that the subscriber's sender runs (connection.py).
        self.backlogged = False
        self.metrics = metrics or BrokerMetrics()
        self.limits = limits or LimitPolicy()
        self.limit_log = LimitRecorder(self.metrics)
        self.retained_quota = RetainedQuota()
        self.connections = ConnectionCount()
        self._clients: dict[str, ClientState] = {}
        self.presence = Presence()  # device accounts connected now, since when, last seen
        self._index: SubscriptionIndex[ClientState] = SubscriptionIndex()
        self._shared: SubscriptionIndex[SharedGroup] = SubscriptionIndex()
        self._retained: RetainedStore[tuple[Message, int]] = RetainedStore(max_retained, max_retained_bytes)
        self._sys_retained: dict[str, Message] = {}   # $SYS/...: in memory only, not counted
        self._seq = itertools.count(1)
        self.connecting: set[Connection] = set()
        self._connections: set[Connection] = set()
        self._pending_wills: dict[str, asyncio.TimerHandle] = {}
        self.reserved_client_id = reserved_client_id
        self._gateway_principals = {user_principal(u) for u in (internal.username, *gateway_usernames) if u}
        self.connect_timeout_s = connect_timeout_s
        self.packet_timeout_s = packet_timeout_s
        self._denied_log = LogThrottle()
        self._drop_log = LogThrottle()
        self._retained_log = LogThrottle()
        self._throttled_log = LogThrottle()
        self.started_mono = time.monotonic()

    # ================================================================== state
    def restore(self, loaded: LoadedState) -> None:
        """Retained messages and persistent sessions from SQLite (before ``start``)."""
        self._seq = itertools.count(loaded.next_seq)
        over_limit = expired = 0
        now = time.monotonic()
        for topic, (payload, qos, principal, props, wall_expiry) in loaded.retained.items():
            msg = Message(topic, payload, props, _monotonic(wall_expiry))
            if msg.expired(now):
                expired += 1
                if self._store is not None:
                    self._store.clear_retained(topic)
                continue
            size = _retained_size(topic, payload)
            gateway = principal is not None and principal in self._gateway_principals
            owner = None if gateway else principal   # stored before owners were recorded: no one's
            if self._retained.put(topic, (msg, qos), size, exempt=gateway):
                self.retained_quota.stored(topic, owner, size)
            else:
                over_limit += 1
                if self._store is not None:
                    self._store.clear_retained(topic)
        self.metrics.expired += expired
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
            cs.expiry_s = stored.expiry_s
            if stored.seen_at is not None:  # the gateway's clock on disk (gateway.clock), monotonic in memory
                cs.offline_since = time.monotonic() - max(0.0, clock.now() - stored.seen_at)
            for topic_filter, options in stored.subscriptions.items():
                self.subscribe(cs, topic_filter, options)
            cs.restore([(Outgoing(self._stored_body(bodies, m), m.qos, m.retain, m.seq, m.sub_ids,
                                  self._group_of(m.share)), m.packet_id, m.state) for m in stored.messages])
            cs.qos2_in = set(stored.qos2_in)
            self._clients[cs.client_id] = cs
            self._arm_expiry(cs)
        for stored_will in loaded.wills:
            will_cs = self._clients.get(stored_will.client_id)
            if will_cs is None:
                continue
            will = Will(stored_will.topic, stored_will.payload, stored_will.qos, stored_will.retain, stored_will.props,
                        stored_will.expiry_s)
            # Due on the gateway's clock: a restart in between does not reset the Will Delay Interval.
            self._pending_wills[will_cs.client_id] = asyncio.get_running_loop().call_later(
                max(0.0, stored_will.due_at - clock.now()), self._delayed_will, will_cs.client_id, will_cs, will)
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
            return Message(m.topic, m.payload, m.props, _monotonic(m.expires_at))
        msg = bodies.get(m.body_id)
        if msg is None:
            msg = bodies[m.body_id] = Message(m.topic, m.payload, m.props, _monotonic(m.expires_at))
            msg.body_id, msg.shared = m.body_id, True
        msg.refs += 1
        return msg

    def _legacy_owner(self, username: str | None) -> str:
        """The owner of a session stored before sessions had owners: its username, else
        anonymous on the (first) listener that lets anonymous clients in."""
        if username:
            return user_principal(username)
        anonymous = [s.name for s in self._sections if s.allow_anonymous]
        return anonymous_principal(anonymous[0] if anonymous else "")

    def _new_client(self, client_id: str, clean: bool) -> ClientState:
        gateway = client_id == self.reserved_client_id
        return ClientState(client_id, clean, store=self._store, metrics=self.metrics, seq=self._seq,
                           max_queued=self._max_queued, capped=not gateway,
                           max_inflight=GATEWAY_MAX_INFLIGHT if gateway else MAX_INFLIGHT,
                           drop_log=self._drop_log, limit_log=self.limit_log, connections=self.connections,
                           presence=self.presence)

    def _client_limits(self, role: str | None, owner: str | None) -> ClientLimits:
        return self.limits.for_role(role, gateway=owner in self._gateway_principals)

    def _compile_acl(self, role: str | None, username: str | None) -> ClientAcl:
        rule = self._roles.get(role or "") or AclRule()  # a role that vanished from the config: nothing
        return ClientAcl(rule, self._prefix, username)

    def _discard(self, cs: ClientState) -> None:
        """Forget a session: its subscriptions, queue and (if persistent) its rows."""
        cs.release_all()
        for topic_filter in list(cs.subscriptions):
            self._unindex(cs, topic_filter)
        cs.subscriptions.clear()
        cs.pending.clear()
        cs.pending_bytes = 0
        cs.inflight.clear()
        cs.cancel_expiry()
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
            subscriptions=len(self._index) + sum(len(g.members) for g, _ in self._shared_groups()),
            retained=len(self._retained),
            retained_bytes=self._retained.bytes,
            queued=sum(len(cs.pending) for cs in self._clients.values()),
            queued_bytes=sum(cs.pending_bytes for cs in self._clients.values()),
            inflight=sum(len(cs.inflight) for cs in self._clients.values()),
            persist_backlog=store.backlog if store is not None else 0,
            persist_failing=int(store.failing) if store is not None else 0,
            uptime_s=int(time.monotonic() - self.started_mono),
        )

    def _shared_groups(self) -> list[tuple[SharedGroup, int]]:
        return [entry for subs in (*self._shared._exact.values(), *self._shared._wild.values())  # noqa: SLF001
                for entry in subs.values()]

    # ================================================================== listeners
    async def start(self) -> None:
        for section in self._sections:
            listener = Listener(section, self._accept)
            await listener.start()
            self._listeners.append(listener)

    async def _accept(self, reader: asyncio.StreamReader, writer: Writer, section: ListenerSection,
                      remote: str) -> None:
        if len(self.connecting) >= self.limits.max_connections:
            self.limit_log.hit(Limit.CONNECTIONS, None, remote=remote, connecting=len(self.connecting))
            writer.abort()
            return
        conn = Connection(self, reader, writer, section, remote)
        conn.limit_packets_in(MAX_CONNECT_PACKET)   # the sender is not known yet: its CONNECT is bounded
        self._connections.add(conn)
        try:
            await conn.serve()
        except Exception as exc:  # one client's trouble must never take the broker down
            log.warning("client connection failed", client_id=conn.client.client_id if conn.client else None,
                        error=repr(exc))
            conn.abort()
        finally:
            self._connections.discard(conn)

    # ================================================================== connect
    async def authorize(self, username: str | None, password: str | None, section: ListenerSection,
                        remote: str = "") -> tuple[str | None, Reason, str | None]:
        """(role, SUCCESS, the account's password hash) or (None, the refusal, None). Passwords
        are never logged; the hash lets accounts.py close the connection when the password
        changes. ``remote`` (host:port) is where repeated failures are counted (logins.py)."""
        role: str | None
        if username is not None:
            if username == self._internal.username:
                ok = secrets.compare_digest((password or "").encode(), self._internal.password.encode())
                return ("admin", Reason.SUCCESS, None) if ok else (None, Reason.BAD_USER_NAME_OR_PASSWORD, None)
            try:
                verdict, account = await self.logins.verify(username, password or "", source_of(remote))
            except PasswordFileError as exc:
                log.error("password file unreadable", error=str(exc))
                return None, Reason.NOT_AUTHORIZED, None
            if verdict is Verdict.THROTTLED:
                self.metrics.logins_throttled += 1
                suppressed = self._throttled_log(source_of(remote))
                if suppressed is not None:
                    log.warning("mqtt connection refused unchecked: too many failed logins from this address "
                                "(this line repeats at most once a minute per address)", remote=remote,
                                username=username, listener=section.name, suppressed_since_last=suppressed)
                return None, Reason.SERVER_BUSY, None
            if account is None:
                return None, Reason.BAD_USER_NAME_OR_PASSWORD, None
            role, account_hash = account.role, account.hash
        elif section.allow_anonymous:
            role, account_hash = section.anonymous_role, None
        else:
            return None, Reason.NOT_AUTHORIZED, None
        if role not in self._roles:
            log.warning("account has a role the configuration does not define", username=username, role=role)
            return None, Reason.NOT_AUTHORIZED, None
        if username is not None and not await self.logins.admit(user_principal(username)):
            self.metrics.logins_throttled += 1
            return None, Reason.SERVER_BUSY, None
        return role, Reason.SUCCESS, account_hash

    def violated(self, conn: Connection) -> None:
        """``conn`` is being closed for a protocol violation or a packet over its limit: its
        account's next CONNECTs wait if it keeps doing that (logins.Logins.violated)."""
        cs = conn.client
        if cs is None or cs.username is None or self.is_gateway(cs):
            # Anonymous clients are not counted: many may share one address (a NAT, a test
            # suite on 127.0.0.1), and slowing the address would slow them all.
            return
        self.logins.violated(user_principal(cs.username))

    def owner_of(self, username: str | None, section: ListenerSection) -> str:
        return user_principal(username) if username is not None else anonymous_principal(section.name)

    def ownership_refusal(self, client_id: str, owner: str) -> str | None:
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

    def limits_of(self, role: str | None, owner: str | None) -> ClientLimits:
        """``[broker.limits]`` as they apply to a client of ``role`` owned by ``owner``."""
        return self._client_limits(role, owner)

    def quota_refusal(self, packet: ConnectPacket, role: str, owner: str) -> Limit | None:
        """max_connections (total and per role) and max_sessions_per_account for a CONNECT that
        passed authentication and ownership; None: admitted. Nothing is touched before the
        verdict, except that a principal at its session limit loses its longest-offline
        session(s) to a new one (only when one is offline; otherwise the CONNECT is refused)."""
        limits = self._client_limits(role, owner)
        client_id = packet.client_id
        old = self._clients.get(client_id)
        if limits.max_connections and not (old is not None and old.handler is not None):  # a takeover adds none
            if self.connections.total >= self.limits.max_connections:
                return Limit.CONNECTIONS
            if self.connections.by_role.get(role, 0) >= limits.max_connections:
                return Limit.CONNECTIONS
        cap = limits.max_sessions_per_account
        persistent = packet.session_expiry != 0
        if cap and persistent and (old is None or old.clean or packet.clean_start):
            held = [cs for cs in self._clients.values() if not cs.clean and cs.owner == owner and cs is not old]
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
        account has no rights left to publish one); a clean session ends with it. A 5.0 client
        is told: DISCONNECT 0x98 (Administrative action)."""
        conn = cs.handler
        if conn is None:
            return
        conn.client = None   # connection_closed then does nothing more for it
        conn.no_will = True
        cs.detach()
        self.metrics.clients_connected -= 1
        conn.disconnect(Reason.ADMINISTRATIVE_ACTION)
        if cs.clean or cs.expiry_s == 0:
            self._discard(cs)
        else:
            self._arm_expiry(cs)

    def forget(self, cs: ClientState) -> None:
        """Forget a session with its subscriptions and queue (its account is gone)."""
        self.disconnect(cs)
        self._discard(cs)

    def change_role(self, cs: ClientState, role: str) -> None:
        """The session's account has a new role: its ACL and limits, now."""
        cs.role = role
        cs.acl = self._compile_acl(role, cs.username)
        cs.limits = self._client_limits(role, cs.owner)
        conn = cs.handler
        if conn is not None:
            cs.rate = (RateBucket(cs.limits.max_publish_rate, cs.limits.max_publish_bytes_rate)
                       if cs.limits.rate_limited else None)
            cs.recount()
            conn.limit_packets_in(cs.limits.max_packet_size)
        if not cs.clean and self._store is not None:
            self._store.session(cs.client_id, cs.username, role, cs.owner, cs.expiry_s)

    def expire_sessions(self) -> int:
        """Forget persistent sessions offline longer than their role's session_expiry_s (also
        MQTT 3.1.1 ones, like Mosquitto's persistent_client_expiration); the number forgotten.
        (A 5.0 session's own Session Expiry Interval has its timer: :meth:`_arm_expiry`.)"""
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

    def packet_too_large(self, cs: ClientState | None, length: int | None, limit: int | None = None) -> None:
        """The reader saw a fixed header over the client's max_packet_size (``length``), or a
        websocket frame over one such packet (``length`` None; the cap is ``limit`` plus the fixed
        header): counted, logged; the connection is closed without reading the body."""
        how = {"packet_bytes": length} if length is not None else {"websocket_frame_over": limit}
        if cs is None:
            self.limit_log.hit(Limit.PACKET_SIZE, None, packet="CONNECT", max_connect_packet=MAX_CONNECT_PACKET, **how)
            return
        self.limit_log.hit(Limit.PACKET_SIZE, cs.client_id, username=cs.username, role=cs.role,
                           max_packet_size=cs.limits.max_packet_size, **how)

    async def rate_pause(self, cs: ClientState, pause: float) -> None:
        """A client over its publish rate: its connection is not read for ``pause`` seconds
        (TCP pushes back on it; nothing it sent is lost)."""
        self.limit_log.hit(Limit.RATE, cs.client_id, username=cs.username, role=cs.role,
                           max_publish_rate=cs.limits.max_publish_rate,
                           max_publish_bytes_rate=cs.limits.max_publish_bytes_rate)
        await asyncio.sleep(pause)

    def open_session(self, conn: Connection, packet: ConnectPacket, role: str, owner: str,
                     account_hash: str | None = None) -> tuple[ClientState, bool]:
        """Take over a live connection, then resume or start afresh.

        3.1.1: CleanSession=1 discards the old session and the new one ends with the
        connection. 5.0: Clean Start=1 discards the old session [MQTT-3.1.2-4]; the new or
        resumed session outlives the connection for its Session Expiry Interval."""
        client_id = packet.client_id
        will = self._pending_wills.pop(client_id, None)
        if will is not None:
            will.cancel()   # the client is back before its Will Delay Interval ran out [MQTT-3.1.3-9]
            if self._store is not None:
                self._store.will_done(client_id)
        old = self._clients.get(client_id)
        if old is not None and old.handler is not None:
            # [MQTT-3.1.4-2] the existing connection is closed (5.0: DISCONNECT 0x8E). Its will is
            # not sent: the same client is back, and a late "offline" will would race its new state.
            old_conn = old.handler
            old_conn.client = None
            old.detach()
            self.metrics.clients_connected -= 1
            old_conn.disconnect(Reason.SESSION_TAKEN_OVER)
            log.info("client id taken over by a new connection", client_id=client_id)
        expiry = packet.session_expiry
        persistent = expiry != 0
        present = False
        if packet.clean_start:
            if old is not None:
                self._discard(old)  # [MQTT-3.1.2-6]
            cs = self._new_client(client_id, clean=not persistent)
        elif old is not None and not old.clean:
            cs, present = old, True  # [MQTT-3.1.2-4], [MQTT-3.2.2-2]
            cs.cancel_expiry()
        else:
            if old is not None:
                self._discard(old)
            cs = self._new_client(client_id, clean=not persistent)
        cs.expiry_s = expiry if packet.version == V5 else None
        cs.username, cs.role, cs.owner = packet.username, role, owner
        cs.acl = self._compile_acl(role, packet.username)
        cs.limits = self._client_limits(role, owner)
        cs.account_hash = account_hash
        self._clients[client_id] = cs
        if not cs.clean and self._store is not None:
            self._store.session(client_id, packet.username, role, owner, cs.expiry_s)
        self._collect_shared(cs)
        return cs, present

    def _group_of(self, subscription: str | None) -> SharedGroup | None:
        """The group of a ``$share/<group>/<filter>`` subscription (None: not one, or no member left)."""
        if not subscription:
            return None
        try:
            parsed = split_shared(subscription)
        except ValueError:
            return None
        return self._shared.match_filter(parsed[1], subscription) if parsed is not None else None

    def _collect_shared(self, cs: ClientState) -> None:
        """A member of shared subscriptions connects: the QoS 1/2 messages that offline members of
        its groups got through the group and never acknowledged come to it. They were kept by a
        member whose connection ended while no other member was connected, or when the broker
        stopped (a restart ends every connection and hands nothing over)."""
        for subscription, options in cs.subscriptions.items():
            group = self._group_of(subscription)
            if group is None:
                continue
            sub_qos = options & QOS_MASK
            for other, _ in list(group.members.values()):
                if other is cs or other.handler is not None:
                    continue
                for out in other.take_shared(group, cs.acl):
                    cs.enqueue(out.msg, min(out.qos, sub_qos), out.retain, sub_ids_of(options), group)
                    other.forget_taken(out)
                    self.metrics.shared_handed_over += 1

    def set_session_expiry(self, cs: ClientState, expiry: int | None) -> None:
        """A 5.0 DISCONNECT changed the Session Expiry Interval [MQTT-3.14.2-2]."""
        cs.expiry_s = expiry
        if not cs.clean and self._store is not None:
            self._store.session(cs.client_id, cs.username, cs.role, cs.owner, expiry)

    def _arm_expiry(self, cs: ClientState) -> None:
        """The 5.0 Session Expiry Interval counts from the end of the last connection (across a
        restart too: ``offline_since`` comes from the stored disconnect time)."""
        if cs.expiry_s is not None and cs.handler is None and not cs.clean:
            remaining = cs.expiry_s - (time.monotonic() - cs.offline_since)
            cs.arm_expiry(max(0.0, remaining), self._expire_session)

    def _expire_session(self, cs: ClientState) -> None:
        if cs.handler is None and self._clients.get(cs.client_id) is cs:
            self.metrics.sessions_expired += 1
            log.info("session expired (Session Expiry Interval)", client_id=cs.client_id, expiry_s=cs.expiry_s)
            will = self._pending_wills.pop(cs.client_id, None)
            if will is not None:   # the session ends before the will's delay: published now [MQTT-3.1.3-9]
                will.cancel()
                will._run()  # noqa: SLF001 - a TimerHandle's callback, run once now
            self._discard(cs)

    async def connection_closed(self, conn: Connection, abnormal: bool) -> None:
        """The one place a connection ends: will, session state, metrics, socket."""
        cs = conn.client
        conn.client = None
        if cs is not None and cs.handler is conn:
            packet = conn.connect
            if abnormal and packet is not None and packet.will is not None and not conn.no_will:
                self._schedule_will(cs, packet.will)  # [MQTT-3.1.2-8]; not after DISCONNECT [MQTT-3.14.4-3]
            cs.detach()
            self.metrics.clients_connected -= 1
            self._hand_over(cs)
            if cs.clean or cs.expiry_s == 0:
                self._discard(cs)
            else:
                self._arm_expiry(cs)
            log.debug("client disconnected", client_id=cs.client_id, abnormal=abnormal)
        if not conn.closed:
            conn.close_now()

    def _hand_over(self, cs: ClientState) -> None:
        """A shared-subscription member left: its unacknowledged messages of the group go to
        another connected member (queued there first, then forgotten here)."""
        taken = cs.take_shared()
        kept: list[Outgoing] = []
        for out in taken:
            group = out.group
            member = group.pick(out.msg.topic, leaving=cs) if group is not None else None
            if member is None:
                kept.append(out)
                continue
            other, options = member
            sub_qos = options & QOS_MASK
            other.enqueue(out.msg, min(out.qos, sub_qos), out.retain, sub_ids_of(options), group)
            cs.forget_taken(out)
            self.metrics.shared_handed_over += 1
        if kept:  # no other member to take them: they stay in the session, in flight ones first
            cs.restore([(out, out.packet_id, out.state) for out in kept])

    def _schedule_will(self, cs: ClientState, will: Will) -> None:
        delay = will.delay_s
        if cs.expiry_s is not None:
            delay = min(delay, cs.expiry_s)
        if delay <= 0:
            self._publish_will(cs, will)
            return
        client_id = cs.client_id
        self._pending_wills[client_id] = asyncio.get_running_loop().call_later(
            delay, self._delayed_will, client_id, cs, will)
        if cs.persistent:
            # Kept across a restart (the session is; a will with no session left is published at once).
            self._store.will_delayed(client_id, will.topic, will.payload, will.qos, will.retain,  # type: ignore[union-attr]
                                     will.props, will.expiry_s, clock.now() + delay)

    def _delayed_will(self, client_id: str, cs: ClientState, will: Will) -> None:
        self._pending_wills.pop(client_id, None)
        if cs.persistent:
            self._store.will_done(client_id)  # type: ignore[union-attr]
        self._publish_will(cs, will)

    def _publish_will(self, cs: ClientState, will: Will) -> None:
        if not valid_topic_name(will.topic) or will.qos > 2:
            return
        if cs.acl is not None and not cs.acl.may_publish(will.topic):
            self.metrics.denied_publish += 1
            log.info("will denied by ACL", client_id=cs.client_id, topic=will.topic)
            return
        self.metrics.wills_published += 1
        expires_at = time.monotonic() + will.expiry_s if will.expiry_s is not None else None
        self.route(will.topic, will.payload, will.qos, will.retain, will.props, expires_at, publisher=cs)

    # ================================================================== publish
    def route(self, topic: str, payload: bytes, qos: int, retain: bool, props: bytes = b"",
              expires_at: float | None = None, publisher: ClientState | None = None) -> bool:
        """Store (retain) and fan out one message; True when it queued durable writes.

        A retained message counts against its ``publisher``'s principal (retained quota);
        the gateway's own retained messages count against no one and pass the store's limits,
        so no client can crowd out job, alarm and gateway status."""
        durable = False
        msg: Message | None = None
        if retain:
            store = self._store
            if payload:
                msg = Message(topic, payload, props, expires_at)
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
                        store.retain(topic, payload, qos, publisher.owner if publisher is not None else None,
                                     props, _wall(expires_at))
                        durable = True
                else:
                    durable = self._refuse_retained(topic) or durable
            else:
                durable = self._clear_retained(topic) or durable  # [MQTT-3.3.1-10/11]
        targets = self._index.match(topic)
        shared = self._shared.match(topic) if self._shared._exact or self._shared._wild else None  # noqa: SLF001
        if not targets and not shared:
            return durable
        if msg is None:
            msg = Message(topic, payload, props, expires_at)
        msg.shared = len(targets) + (len(shared) if shared else 0) > 1
        metrics = self.metrics
        for entry in targets.values():
            cs = entry[0]
            options = entry[1]
            if options & NO_LOCAL and cs is publisher:
                continue  # [MQTT-3.8.3-3]
            acl = cs.acl
            if acl is not None and not acl.allow_all and not acl.may_receive(topic):
                metrics.denied_receive += 1
                continue
            # Live messages go out with RETAIN=0 [MQTT-3.3.1-9] (5.0: as published when asked
            # [MQTT-3.3.1-12]) at min(pub, sub) [MQTT-3.8.4-6].
            sub_qos = options & QOS_MASK
            if cs.enqueue(msg, qos if qos < sub_qos else sub_qos, retain and bool(options & RETAIN_AS_PUBLISHED),
                          delivery_ids(entry)):
                durable = True
            if cs.backlogged:
                self.backlogged = True  # the reader yields before routing the next message
        if shared:
            for entry in shared.values():
                group = entry[0]
                member = group.pick(topic)
                if member is None:
                    continue
                cs, options = member
                sub_qos = options & QOS_MASK
                if cs.enqueue(msg, qos if qos < sub_qos else sub_qos, retain and bool(options & RETAIN_AS_PUBLISHED),
                              sub_ids_of(options), group):
                    durable = True
                if cs.backlogged:
                    self.backlogged = True
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

    def log_denied_publish(self, cs: ClientState, topic: str, told: bool = False) -> None:
        suppressed = self._denied_log((cs.client_id, topic))
        if suppressed is None:
            return
        acl = cs.acl
        told_how = ("the MQTT 5.0 client was told (reason code 0x87)" if told else
                    "MQTT 3.1.1 has no negative PUBACK, so the client was acknowledged and cannot tell")
        log.warning(
            f"publish denied by ACL and dropped: the client's role may not publish to this topic; {told_how} "
            "(this line repeats at most once a minute per client and topic)",
            client_id=cs.client_id, username=cs.username, role=cs.role, topic=topic,
            role_may_publish=acl.publish_filters if acl is not None else [],
            suppressed_since_last=suppressed)

    def shared_commit_barrier(self) -> asyncio.Future[None] | None:
        """The commit the acknowledgement of a just-routed PUBLISH waits for, shared by every
        PUBLISH routed before that commit begins (:meth:`StateStore.shared_barrier`); None
        without a store. For done-callbacks only, never awaited."""
        if self._store is None:
            return None
        return self._store.shared_barrier()

    async def durable(self, conn: Connection, needed: bool) -> bool:
        """Wait until what an acknowledgement depends on is committed. False: it could not
        be; the connection is closed (no acknowledgement, no will) so the client resends."""
        if not needed or self._store is None:
            return True
        try:
            await self._store.barrier()
        except StateNotStored:
            conn.close_unstored()
            return False
        return True

    # ================================================================== subscribe
    def subscribe(self, cs: ClientState, topic_filter: str, options: int) -> None:
        """Add or replace one subscription (``options``: :mod:`gateway.broker.suboptions`)."""
        if topic_filter in cs.subscriptions:
            self._unindex(cs, topic_filter)
        cs.subscriptions[topic_filter] = options
        try:
            shared = split_shared(topic_filter)
        except ValueError:
            shared = None
        if shared is None:
            self._index.add(topic_filter, cs.client_id, cs, options)
            return
        group_name, inner = shared
        found = self._shared.match_filter(inner, topic_filter)
        if found is None:
            found = SharedGroup(group_name, inner)
            self._shared.add(inner, topic_filter, found, 0)
        found.members[cs.client_id] = (cs, options)

    def unsubscribe(self, cs: ClientState, topic_filter: str) -> bool:
        if topic_filter not in cs.subscriptions:
            return False
        self._unindex(cs, topic_filter)
        del cs.subscriptions[topic_filter]
        return True

    def _unindex(self, cs: ClientState, topic_filter: str) -> None:
        try:
            shared = split_shared(topic_filter)
        except ValueError:
            shared = None
        if shared is None:
            self._index.remove(topic_filter, cs.client_id)
            return
        group = self._shared.match_filter(shared[1], topic_filter)
        if group is not None:
            group.members.pop(cs.client_id, None)
            if not group.members:
                self._shared.remove(shared[1], topic_filter)

    def send_retained(self, cs: ClientState, topic_filter: str, options: int) -> None:
        """Retained messages for one new subscription of one client [MQTT-3.3.1-6/8]; the
        trie walks only what the filter can match. Expired ones are dropped [MQTT-3.3.2-5]."""
        acl = cs.acl
        qos = options & QOS_MASK
        sub_ids = sub_ids_of(options)
        now = time.monotonic()
        expired: list[str] = []
        for topic, (msg, retained_qos) in self._retained.match(topic_filter):
            if msg.expires_at is not None and msg.expired(now):
                expired.append(topic)
                continue
            if acl is not None and not acl.may_receive(topic):
                self.metrics.denied_receive += 1
                continue
            cs.enqueue(msg, min(qos, retained_qos), True, sub_ids)
        for topic in expired:
            self.metrics.expired += 1
            self._clear_retained(topic)
        if topic_filter.startswith("$"):  # only a filter naming '$SYS' can match it [MQTT-4.7.2-1]
            for topic, msg in self._sys_retained.items():
                if matches(topic, topic_filter) and (acl is None or acl.may_receive(topic)):
                    cs.enqueue(msg, 0, True)

    def publish_sys(self, topic: str, payload: bytes) -> None:
        """A ``$SYS`` message from inside the broker: retained in memory (never on disk, not
        in the retained count), QoS 0, to current subscribers whose role may read it."""
        msg = Message(topic, payload)
        self._sys_retained[topic] = msg
        for entry in self._index.match(topic).values():
            cs = entry[0]
            acl = cs.acl
            if acl is not None and not acl.allow_all and not acl.may_receive(topic):
                continue
            cs.enqueue(msg, 0, False)  # live forward: RETAIN=0 [MQTT-3.3.1-9]

    # ================================================================== shutdown
    async def shutdown(self) -> None:
        """Close listeners and connections (5.0 clients are told: 0x8B); persistent sessions
        stay in SQLite."""
        log.debug("embedded broker shutting down")
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connecting):
            conn.abort()
        for handle in self._pending_wills.values():
            handle.cancel()   # a persistent session's delayed will stays in SQLite: re-armed at start
        self._pending_wills.clear()
        for cs in list(self._clients.values()):
            cs.cancel_expiry()
            conn = cs.handler
            if conn is not None:
                conn.client = None
                cs.detach()
                self.metrics.clients_connected -= 1
                conn.disconnect(Reason.SERVER_SHUTTING_DOWN)
            if cs.clean or cs.expiry_s == 0:
                self._discard(cs)
        if self._connections:
            await asyncio.sleep(0)   # let the DISCONNECTs reach the transports before they close
        for conn in list(self._connections):
            conn.abort()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        if self._store is not None:
            try:
                await self._store.flush()
            except StateNotStored:
                pass  # StateStore.close says what could not be written


def _retained_size(topic: str, payload: bytes) -> int:
    return len(topic.encode("utf-8", "surrogatepass")) + len(payload)


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

    @property
    def presence(self) -> Presence | None:
        """Device accounts connected now (see :mod:`gateway.broker.presence`), while running."""
        return self.broker.presence if self.broker is not None else None

    def bound_ports(self) -> dict[str, int]:
        """The port each listener actually listens on, by its configured name: what a
        ``bind`` ending in ``:0`` got from the kernel (tests bind port 0 so two never race)."""
        out: dict[str, int] = {}
        if self.broker is None:
            return out
        for listener in self.broker._listeners:  # noqa: SLF001 - same package
            if listener.port is not None:
                out[listener.section.name] = listener.port
        return out

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
        passwords = PasswordFile(Path(self._cfg.broker.auth.password_file))
        configured = (self._cfg.broker.username,) if self._cfg.broker.username else ()
        broker = GatewayBroker(list(self._cfg.broker.listeners), passwords, self.internal, roles=roles,
                               prefix=self._cfg.prefix, store=store, max_queued=self._cfg.broker.max_queued_messages,
                               metrics=metrics, reserved_client_id=self.reserved_client_id,
                               gateway_usernames=configured, limits=LimitPolicy(self._cfg.broker.limits),
                               **self._options)
        broker.restore(loaded)
        try:
            await broker.start()
        except Exception as exc:
            await broker.shutdown()
            await store.close()
            await self._close_db()
            raise BrokerStartError(_describe_start_error(exc, self._cfg)) from None
        self.broker = broker
        self._sys = SysPublisher(broker, self.sys_interval_s)
        self._sys.start()
        self._accounts = AccountWatcher(broker, passwords, self.accounts_poll_s)
        self._accounts.start()
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop(broker, roles), name="broker-expiry")
        log.info("embedded broker listening",
                 listeners=[f"{s.name}={s.type}://{s.bind}" for s in self._cfg.broker.listeners])

    async def _expire_loop(self, broker: GatewayBroker, roles: dict[str, AclRule]) -> None:
        """Session expiry (broker.limits.session_expiry_s): a sweep every quarter of the shortest
        expiry (at most a minute)."""
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


def _describe_start_error(exc: BaseException, cfg: Config) -> str:
    if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE (Linux, BSD)
        return f"broker.listeners: address already in use ({exc.strerror}): " + ", ".join(
            s.bind for s in cfg.broker.listeners)
    if isinstance(exc, OSError) and exc.errno == 13:
        return f"broker.listeners: permission denied binding {', '.join(s.bind for s in cfg.broker.listeners)}"
    if isinstance(exc, OSError) and exc.errno == 99:
        return f"broker.listeners: cannot bind: address not available: {', '.join(s.bind for s in cfg.broker.listeners)}"
    return f"broker: cannot start: {exc}"
