"""Durable broker state in the gateway's SQLite database (``gateway.db``).

What survives a restart or ``kill -9``: retained messages, and for every persistent
session (CleanSession=0) its subscriptions, its queued and in-flight QoS 1/2
messages (with packet id and QoS 2 progress), the QoS 2 packet ids it has
published but not yet released, and its will while it waits for its Will Delay Interval. Payloads are BLOBs, so binary data round-trips.

A message queued for many persistent sessions is stored once: its body is one row of
``broker_bodies`` that every session's ``broker_messages`` row names (``body_id``), and it
is deleted with the last of them (the broker counts the references in memory; orphans
left by a crash are deleted at start). Before, each session's row carried the payload,
so 200 sessions made every QoS 1 message 200 writes of its body.

Writes are queued by the broker as they happen and committed in groups by one
flusher task ("group commit"): one transaction (one fsync) carries everything that
accumulated while the previous one ran. Operations on the same row coalesce before
they reach the disk, so a message queued and acknowledged within one group never
costs a write. Whoever must not answer before the state is durable (a PUBACK to a
publisher, a QoS 2 PUBLISH) awaits :meth:`StateStore.barrier`.

A commit that fails (disk full, I/O error, read-only file) fails every barrier that
waited for it, so nothing is acknowledged that is not on disk; the operations are kept
and retried first, in order, with backoff, until the disk takes them again. Replaying
them ahead of what was queued since gives the same rows as if the commit had worked,
so the coalescing rules below need no special case.

An acknowledged message is deleted (no replay after restart), an unsubscribe deletes the
filter, and a session that reconnects with CleanSession=1 (5.0: Clean Start) is forgotten.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway import clock
from gateway.storage import Database, NotStored, run_script

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS broker_retained (
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS broker_sessions (
    client_id TEXT PRIMARY KEY, username TEXT, role TEXT, created_at REAL NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0, owner TEXT);
CREATE TABLE IF NOT EXISTS broker_subscriptions (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL, PRIMARY KEY (client_id, filter));
CREATE TABLE IF NOT EXISTS broker_messages (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL DEFAULT 0, packet_id INTEGER,
    state INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, seq));
CREATE TABLE IF NOT EXISTS broker_qos2_in (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, PRIMARY KEY (client_id, packet_id));
CREATE TABLE IF NOT EXISTS broker_bodies (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);
"""
# Columns added after the first release (databases written before get them at start).
_ADDED_COLUMNS = (
    ("broker_sessions", "owner", "TEXT"),
    ("broker_sessions", "seen_at", "REAL"),          # gateway.clock time of the last disconnect (session expiry)
    ("broker_retained", "owner", "TEXT"),            # principal that set it (retained quota)
    ("broker_messages", "body_id", "INTEGER"),       # broker_bodies row holding the payload (payload is then '')
    # MQTT 5.0: properties passed through to subscribers (encoded), the Message Expiry as wall-clock
    # time, the Subscription Identifier a queued message is delivered with, the Session Expiry Interval.
    ("broker_retained", "props", "BLOB"),
    ("broker_retained", "expires_at", "REAL"),
    ("broker_messages", "props", "BLOB"),
    ("broker_messages", "expires_at", "REAL"),
    ("broker_messages", "sub_id", "INTEGER"),
    ("broker_sessions", "expiry_s", "INTEGER"),
)

# broker_messages.state
QUEUED = 0      # not sent yet
SENT = 1        # PUBLISH sent, waiting for PUBACK / PUBREC
RELEASED = 2    # QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP


@dataclass
class StoredMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None
    state: int
    body_id: int | None = None   # shared body (broker_bodies): the same id is the same message
    props: bytes = b""              # MQTT 5.0 properties passed through to subscribers (encoded)
    expires_at: float | None = None   # end of the Message Expiry Interval on the gateway clock (gateway.clock)
    sub_ids: tuple[int, ...] = ()   # the Subscription Identifiers it is delivered with
    share: str | None = None        # the shared subscription it came through ($share/<group>/<filter>)


RETRY_INITIAL_S = 0.2   # first retry of a failed commit; doubles up to RETRY_MAX_S
RETRY_MAX_S = 5.0


class StateNotStored(NotStored):
    """The broker's state could not be committed: do not acknowledge what depended on it."""


@dataclass
class StoredSession:
    client_id: str
    username: str | None
    role: str | None
    dropped: int = 0
    owner: str | None = None     # the principal the session belongs to (None: written before owners existed)
    seen_at: float | None = None  # gateway.clock time of its last disconnect (None: not recorded)
    expiry_s: int | None = None  # MQTT 5.0 Session Expiry Interval (None: until removed, as 3.1.1)
    subscriptions: dict[str, int] = field(default_factory=dict)
    messages: list[StoredMessage] = field(default_factory=list)
    qos2_in: set[int] = field(default_factory=set)


@dataclass
class StoredWill:
    """A will waiting for its Will Delay Interval; ``due_at`` on the gateway clock."""

    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes
    expiry_s: int | None
    due_at: float


@dataclass
class LoadedState:
    # topic -> (payload, qos, principal that set it, 5.0 properties, wall-clock expiry)
    retained: dict[str, tuple[bytes, int, str | None, bytes, float | None]]
    sessions: dict[str, StoredSession]
    next_seq: int
    next_body: int = 1
    wills: list[StoredWill] = field(default_factory=list)


def _migrate(conn: sqlite3.Connection) -> None:
    run_script(conn, SCHEMA)
    for table, column, kind in _ADDED_COLUMNS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


# The broker's migrations, oldest first, run by the schema registry (gateway.migrations)
# when the database is opened: never edit a released one.
def _add_sub_ids(conn: sqlite3.Connection) -> None:
    """broker_messages.sub_ids: every Subscription Identifier ("3,7") of a message that matched
    overlapping subscriptions of one client (``sub_id`` keeps a single one)."""
    if "sub_ids" not in {row[1] for row in conn.execute("PRAGMA table_info(broker_messages)")}:
        conn.execute("ALTER TABLE broker_messages ADD COLUMN sub_ids TEXT")


def _add_wills(conn: sqlite3.Connection) -> None:
    """broker_wills: a will waiting for its Will Delay Interval (MQTT 5.0), so a restart in
    between publishes it when it is due instead of forgetting it."""
    conn.execute("CREATE TABLE IF NOT EXISTS broker_wills (client_id TEXT PRIMARY KEY, topic TEXT NOT NULL,"
                 " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, props BLOB,"
                 " expiry_s INTEGER, due_at REAL NOT NULL)")


def _add_share(conn: sqlite3.Connection) -> None:
    """broker_messages.share: the shared subscription (``$share/<group>/<filter>``) a queued message
    came through, so it can still be handed to another member of the group after a restart."""
    if "share" not in {row[1] for row in conn.execute("PRAGMA table_info(broker_messages)")}:
        conn.execute("ALTER TABLE broker_messages ADD COLUMN share TEXT")


MIGRATIONS = (_migrate, _add_sub_ids, _add_wills, _add_share)


def _load(conn: sqlite3.Connection) -> LoadedState:
    retained = {row[0]: (bytes(row[1]), int(row[2]), row[3], bytes(row[4] or b""), row[5])
                for row in conn.execute("SELECT topic, payload, qos, owner, props, expires_at FROM broker_retained")}
    sessions: dict[str, StoredSession] = {}
    for cid, username, role, dropped, owner, seen_at, expiry_s in conn.execute(
            "SELECT client_id, username, role, dropped, owner, seen_at, expiry_s FROM broker_sessions"):
        sessions[cid] = StoredSession(cid, username, role, int(dropped), owner, seen_at, expiry_s)
    for cid, flt, qos in conn.execute("SELECT client_id, filter, qos FROM broker_subscriptions"):
        if cid in sessions:
            sessions[cid].subscriptions[flt] = int(qos)
    next_seq = 1
    lost: list[tuple[str, int]] = []
    for (cid, seq, topic, payload, qos, retain, pid, state, body_id, body, props, expires_at, sub_id, sub_ids,
         share) in conn.execute(
            "SELECT m.client_id, m.seq, m.topic, m.payload, m.qos, m.retain, m.packet_id, m.state, m.body_id,"
             " b.payload, m.props, m.expires_at, m.sub_id, m.sub_ids, m.share"
            " FROM broker_messages m LEFT JOIN broker_bodies b ON b.id = m.body_id ORDER BY m.seq"):
        next_seq = max(next_seq, int(seq) + 1)
        if body_id is not None and body is None:
            lost.append((cid, seq))  # cannot happen: the body goes with its last row
            continue
        if cid in sessions:
            sessions[cid].messages.append(StoredMessage(int(seq), topic, bytes(body if body_id is not None else payload),
                                                        int(qos), bool(retain), pid, int(state), body_id,
                                                        bytes(props or b""), expires_at, _load_ids(sub_id, sub_ids),
                                                        share))
    if lost:
        log.error("queued messages without their body were deleted", messages=len(lost))
        conn.executemany(_MSG_DEL, lost)
    for cid, pid in conn.execute("SELECT client_id, packet_id FROM broker_qos2_in"):
        if cid in sessions:
            sessions[cid].qos2_in.add(int(pid))
    # Rows of sessions that no longer exist (never written that way, but be tolerant).
    conn.execute("DELETE FROM broker_subscriptions WHERE client_id NOT IN (SELECT client_id FROM broker_sessions)")
    conn.execute("DELETE FROM broker_messages WHERE client_id NOT IN (SELECT client_id FROM broker_sessions)")
    conn.execute("DELETE FROM broker_qos2_in WHERE client_id NOT IN (SELECT client_id FROM broker_sessions)")
    # Bodies no row names any more (a crash between the last row's delete and the body's).
    conn.execute("DELETE FROM broker_bodies WHERE id NOT IN"
                 " (SELECT body_id FROM broker_messages WHERE body_id IS NOT NULL)")
    next_body = int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM broker_bodies").fetchone()[0])
    conn.execute("DELETE FROM broker_wills WHERE client_id NOT IN (SELECT client_id FROM broker_sessions)")
    wills = [StoredWill(cid, topic, bytes(payload), int(qos), bool(retain), bytes(props or b""), expiry_s, due_at)
             for cid, topic, payload, qos, retain, props, expiry_s, due_at in conn.execute(
                 "SELECT client_id, topic, payload, qos, retain, props, expiry_s, due_at FROM broker_wills")]
    return LoadedState(retained, sessions, next_seq, next_body, wills)


# Pending operations are keyed by the row they touch; a later op on the same row
# replaces (or cancels) an earlier one that has not been written yet.
Key = tuple[Any, ...]


class StateStore:
    """Queues row operations and commits them in groups on the database thread."""

    def __init__(self, db: Database, on_error: Any = None, *, retry_initial_s: float = RETRY_INITIAL_S,
                 retry_max_s: float = RETRY_MAX_S):
        self._db = db
        self._pending: dict[Key, tuple[Any, ...]] = {}
        self._retry: list[tuple[Any, ...]] = []   # operations of failed commits, oldest first
        self._waiters: list[asyncio.Future[None]] = []
        self._shared: asyncio.Future[None] | None = None   # see shared_barrier
        self._flusher: asyncio.Task[None] | None = None
        self._on_error = on_error
        self._closed = False
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._kick = asyncio.Event()  # cuts a retry delay short (shutdown)
        self.failing = False        # a failure episode is going on (logged once)
        self.commits = 0
        self.failed_commits = 0
        self._next_body = 1
        self._writing = 0           # operations in the commit now running: not on disk yet either

    @property
    def backlog(self) -> int:
        """Operations not yet on disk (queued, being written, or waiting for a retry)."""
        return len(self._pending) + len(self._retry) + self._writing

    async def open(self) -> LoadedState:
        """The stored state (the tables exist: the database was opened with its migrations)."""
        loaded = await self._db.run(_load)
        self._next_body = max(self._next_body, loaded.next_body)
        return loaded

    # ------------------------------------------------------------------ operations
    def _put(self, key: Key, op: tuple[Any, ...]) -> None:
        self._pending.pop(key, None)
        self._pending[key] = op  # moved to the end: applied after everything before it
        self._schedule()

    def retain(self, topic: str, payload: bytes, qos: int, owner: str | None = None, props: bytes = b"",
               expires_at: float | None = None) -> None:
        self._put(("ret", topic), ("ret_put", topic, payload, qos, owner, props or None, expires_at))

    def clear_retained(self, topic: str) -> None:
        self._put(("ret", topic), ("ret_del", topic))

    def session(self, client_id: str, username: str | None, role: str | None, owner: str | None = None,
                expiry_s: int | None = None) -> None:
        self._put(("sess", client_id), ("sess_put", client_id, username, role, owner, expiry_s))

    def forget_session(self, client_id: str) -> None:
        # Drop not-yet-written rows of this client: the delete covers them anyway.
        # The delete has its own key, so a re-creation queued after it (a
        # ``session()`` in the same batch) is applied after it instead of replacing it.
        for key in [k for k in self._pending if len(k) > 1 and k[1] == client_id and k[0] != "ret"]:
            del self._pending[key]
        self._put(("sess_del", client_id), ("sess_del", client_id))

    def session_seen(self, client_id: str, at: float) -> None:
        """The session's connection ended at wall-clock ``at`` (its expiry counts from here)."""
        self._put(("seen", client_id), ("sess_seen", client_id, at))

    def dropped(self, client_id: str, count: int) -> None:
        self._put(("drop", client_id), ("sess_drop", client_id, count))

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        self._put(("sub", client_id, topic_filter), ("sub_put", client_id, topic_filter, qos))

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        self._put(("sub", client_id, topic_filter), ("sub_del", client_id, topic_filter))

    def queue_message(self, client_id: str, seq: int, topic: str, payload: bytes, qos: int,
                      retain: bool = False, props: bytes = b"", expires_at: float | None = None,
                      sub_ids: tuple[int, ...] = (), share: str | None = None) -> None:
        self._put(("msg", client_id, seq),
                  ("msg_put", client_id, seq, topic, payload, qos, int(retain), None, QUEUED, None, props or None,
                   expires_at, *_store_ids(sub_ids), share))

    def queue_shared(self, client_id: str, seq: int, msg: Any, qos: int, retain: bool = False,
                     expires_at: float | None = None, sub_ids: tuple[int, ...] = (), share: str | None = None) -> None:
        """Queue ``msg`` (a ``clients.Message``: ``topic``, ``payload``, ``body_id``, ``refs``) for
        one session, its body stored once for every session that queues it. Each call must be
        matched by one :meth:`release_body` when the session is done with it."""
        if not msg.body_id:
            msg.body_id = self._next_body
            self._next_body += 1
            self._put(("body", msg.body_id), ("body_put", msg.body_id, msg.payload))
        msg.refs += 1
        self._put(("msg", client_id, seq),
                  ("msg_put", client_id, seq, msg.topic, b"", qos, int(retain), None, QUEUED, msg.body_id,
                   msg.props or None, expires_at, *_store_ids(sub_ids), share))

    def release_body(self, msg: Any) -> None:
        """One session is done with ``msg``: the body goes with the last reference."""
        if not msg.body_id:
            return
        msg.refs -= 1
        if msg.refs > 0:
            return
        key = ("body", msg.body_id)
        earlier = self._pending.pop(key, None)
        if earlier is None or earlier[0] != "body_put":  # on disk (or retrying): delete it there
            self._put(key, ("body_del", msg.body_id))
        msg.body_id, msg.refs = 0, 0

    def message_state(self, client_id: str, seq: int, packet_id: int, state: int) -> None:
        key = ("msg", client_id, seq)
        earlier = self._pending.get(key)
        if earlier is not None and earlier[0] == "msg_put":
            self._put(key, earlier[:7] + (packet_id, state) + earlier[9:])
        else:
            self._put(key, ("msg_upd", client_id, seq, packet_id, state))

    def message_done(self, client_id: str, seq: int) -> None:
        key = ("msg", client_id, seq)
        earlier = self._pending.pop(key, None)
        if earlier is not None and earlier[0] == "msg_put":
            return  # queued and finished before it reached the disk
        self._put(key, ("msg_del", client_id, seq))

    def will_delayed(self, client_id: str, topic: str, payload: bytes, qos: int, retain: bool, props: bytes,
                     expiry_s: int | None, due_at: float) -> None:
        """A persistent session's will waits for its Will Delay Interval until ``due_at`` (gateway clock)."""
        self._put(("will", client_id), ("will_put", client_id, topic, payload, qos, int(retain), props or None,
                                         expiry_s, due_at))

    def will_done(self, client_id: str) -> None:
        """The will was published, or cancelled by the client's return."""
        key = ("will", client_id)
        earlier = self._pending.pop(key, None)
        if earlier is not None and earlier[0] == "will_put":
            return
        self._put(key, ("will_del", client_id))

    def qos2_received(self, client_id: str, packet_id: int) -> None:
        self._put(("q2", client_id, packet_id), ("q2_put", client_id, packet_id))

    def qos2_released(self, client_id: str, packet_id: int) -> None:
        key = ("q2", client_id, packet_id)
        earlier = self._pending.pop(key, None)
        if earlier is not None and earlier[0] == "q2_put":
            return
        self._put(key, ("q2_del", client_id, packet_id))

    # ------------------------------------------------------------------ flushing
    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once everything queued so far is committed.

        It fails with :class:`StateNotStored` when that commit fails: the caller must
        not acknowledge what it was waiting for. The operations are not lost; they are
        retried until they are written.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._pending and not self._retry and (self._flusher is None or self._flusher.done()):
            fut.set_result(None)
            return fut
        if self._closed:
            fut.set_exception(StateNotStored("broker state store is closed"))
            return fut
        self._waiters.append(fut)
        self._schedule()
        return fut

    def shared_barrier(self) -> asyncio.Future[None]:
        """:meth:`barrier`, one future for every caller until the flusher takes it: a
        stream of QoS 1 publishes then costs one future (and one write of its PUBACKs, see
        ``GatewayProtocolHandler._dispatch``) per commit instead of one per message.

        Only for callers that add done-callbacks: awaiting it from a task that can be
        cancelled would cancel it for every other caller."""
        shared = self._shared
        if shared is not None and self._waiters and self._waiters[-1] is shared:
            return shared  # not taken by a flush yet: everything queued so far is in its commit
        shared = self._shared = self.barrier()
        return shared

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            if self._closed:
                return
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="broker-state-flush")

    async def _flush_loop(self) -> None:
        delay = 0.0
        while self._pending or self._waiters or self._retry:
            if delay and not self._kick.is_set():
                try:  # a failing disk: do not spin on it
                    await asyncio.wait_for(self._kick.wait(), delay)
                except TimeoutError:
                    pass
            # Failed operations first, in their order, then everything queued since.
            ops = self._retry + list(self._pending.values())
            self._retry, self._pending = [], {}
            waiters, self._waiters = self._waiters, []
            if ops:
                self._writing = len(ops)
                try:
                    await self._db.run(lambda conn: _apply(conn, ops))
                except Exception as exc:  # disk full, I/O error, read-only: keep serving, acknowledge nothing
                    self._writing = 0
                    self._retry = ops
                    self.failed_commits += 1
                    if not self.failing:
                        self.failing = True
                        log.error("broker state write failed; publishes, subscriptions and QoS 2 steps that need "
                                  "it are not acknowledged (their connections are closed so clients resend) "
                                  "until a write succeeds; retrying", error=repr(exc), operations=len(ops))
                    else:
                        log.debug("broker state write failed again", error=repr(exc), operations=len(ops))
                    if self._on_error is not None:
                        self._on_error()
                    failure = StateNotStored(f"broker state not committed: {exc!r}")
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(failure)
                    delay = min(max(delay * 2, self._retry_initial_s), self._retry_max_s)
                    if self._closed:
                        return
                    continue
                self.commits += 1
                if self.failing:
                    self.failing = False
                    log.warning("broker state writes resumed", failed_commits=self.failed_commits,
                                operations=len(ops))
                self._writing = 0  # after `failing` is cleared: an empty backlog means a healthy store
                delay = 0.0
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def flush(self) -> None:
        await self.barrier()

    async def close(self) -> None:
        """Write what is queued (one attempt when failing), then stop."""
        self._kick.set()
        try:
            await self.flush()
        except StateNotStored:
            pass
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._retry or self._pending:
            log.error("broker state not written at shutdown (the disk kept failing)", operations=self.backlog)


_MSG_PUT = ("INSERT OR REPLACE INTO broker_messages"
            " (client_id, seq, topic, payload, qos, retain, packet_id, state, body_id, props, expires_at, sub_id,"
            " sub_ids, share) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _store_ids(sub_ids: tuple[int, ...]) -> tuple[int | None, str | None]:
    """``sub_id`` holds a single identifier (the column older databases have); ``sub_ids`` the
    list when a message matched overlapping subscriptions that each have one."""
    if not sub_ids:
        return None, None
    if len(sub_ids) == 1:
        return sub_ids[0], None
    return sub_ids[0], ",".join(map(str, sub_ids))


def _load_ids(sub_id: int | None, sub_ids: str | None) -> tuple[int, ...]:
    if sub_ids:
        return tuple(int(x) for x in sub_ids.split(","))
    return (int(sub_id),) if sub_id else ()
_MSG_UPD = "UPDATE broker_messages SET packet_id = ?, state = ? WHERE client_id = ? AND seq = ?"
_MSG_DEL = "DELETE FROM broker_messages WHERE client_id = ? AND seq = ?"


def _apply(conn: sqlite3.Connection, ops: list[tuple[Any, ...]]) -> None:
    """Write ``ops`` in their order. A run of consecutive message operations of one kind
    (what a stream of QoS 1 messages to a persistent session produces: puts as they are
    routed, state updates as they are sent, deletes as they are acknowledged) goes to
    SQLite as one ``executemany``; the order of the operations is kept as it is."""
    now = clock.now()
    n = len(ops)
    i = 0
    while i < n:
        op = ops[i]
        kind = op[0]
        if kind in ("msg_put", "msg_upd", "msg_del"):
            j = i + 1
            while j < n and ops[j][0] == kind:
                j += 1
            run = ops[i:j]
            i = j
            if kind == "msg_put":
                conn.executemany(_MSG_PUT, [o[1:] for o in run])
            elif kind == "msg_upd":
                conn.executemany(_MSG_UPD, [(o[3], o[4], o[1], o[2]) for o in run])
            else:
                conn.executemany(_MSG_DEL, [o[1:] for o in run])
            continue
        i += 1
        if kind == "body_put":
            conn.execute("INSERT OR REPLACE INTO broker_bodies (id, payload) VALUES (?, ?)", op[1:])
        elif kind == "body_del":
            conn.execute("DELETE FROM broker_bodies WHERE id = ?", op[1:])
        elif kind == "ret_put":
            conn.execute("INSERT OR REPLACE INTO broker_retained (topic, payload, qos, stored_at, owner, props,"
                         " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)", (op[1], op[2], op[3], now, op[4], op[5], op[6]))
        elif kind == "ret_del":
            conn.execute("DELETE FROM broker_retained WHERE topic = ?", (op[1],))
        elif kind == "sess_put":
            conn.execute("INSERT INTO broker_sessions (client_id, username, role, created_at, owner, expiry_s)"
                         " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET"
                         " username = excluded.username, role = excluded.role, owner = excluded.owner,"
                         " expiry_s = excluded.expiry_s", (op[1], op[2], op[3], now, op[4], op[5]))
        elif kind == "sess_seen":
            conn.execute("UPDATE broker_sessions SET seen_at = ? WHERE client_id = ?", (op[2], op[1]))
        elif kind == "sess_drop":
            conn.execute("UPDATE broker_sessions SET dropped = ? WHERE client_id = ?", (op[2], op[1]))
        elif kind == "will_put":
            conn.execute("INSERT OR REPLACE INTO broker_wills (client_id, topic, payload, qos, retain, props, expiry_s,"
                         " due_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", op[1:])
        elif kind == "will_del":
            conn.execute("DELETE FROM broker_wills WHERE client_id = ?", op[1:])
        elif kind == "sess_del":
            for table in ("broker_sessions", "broker_subscriptions", "broker_messages", "broker_qos2_in",
                          "broker_wills"):
                conn.execute(f"DELETE FROM {table} WHERE client_id = ?", (op[1],))
        elif kind == "sub_put":
            conn.execute("INSERT OR REPLACE INTO broker_subscriptions (client_id, filter, qos) VALUES (?, ?, ?)",
                         op[1:])
        elif kind == "sub_del":
            conn.execute("DELETE FROM broker_subscriptions WHERE client_id = ? AND filter = ?", op[1:])
        elif kind == "q2_put":
            conn.execute("INSERT OR IGNORE INTO broker_qos2_in (client_id, packet_id) VALUES (?, ?)", op[1:])
        elif kind == "q2_del":
            conn.execute("DELETE FROM broker_qos2_in WHERE client_id = ? AND packet_id = ?", op[1:])
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown broker state operation {kind!r}")


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the persistent sessions' last disconnect (the base of their expiry) and the ends
    of stored messages' and retained messages' Message Expiry Interval by ``delta`` s
    (gateway.clock re-anchored)."""
    return (clock.shift_columns(conn, "broker_sessions", "seen_at", delta)
            + clock.shift_columns(conn, "broker_wills", "due_at", delta)
            + clock.shift_columns(conn, "broker_messages", "expires_at", delta)
            + clock.shift_columns(conn, "broker_retained", "expires_at", delta))
