"""Acks: the ``acks`` table, and a recorder batch (results, then acks) as one write.

Each status of a delivery is stored once: the first ack with that status. A later ack with
a status already stored is a repeat, counted on that row (``repeats``, and when the
latest came), not stored again and not forwarded to the cloud. The first valid ack of a
delivery moves it to ``acknowledged`` through the deliveries' one writer
(:class:`gateway.pipeline.deliveries.DeliveryWriter`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.pipeline import jobs
from gateway.pipeline.deliveries import DeliveryWriter, FirstAck, Result
from gateway.pipeline.models import Ack, AckIn, AckVia
from gateway.states import DeliveryState
from gateway.storage import NotStored
from gateway.timeutil import iso

# Bound once: an enum member read through its class costs ~4x a name on the per-row paths.
_IS_QUEUED, _IS_SENT, _IS_ACKED = DeliveryState.QUEUED, DeliveryState.SENT, DeliveryState.ACKNOWLEDGED


class Forwarder(Protocol):
    """Where status changes and acks go besides the local broker (the upstream outbox)."""

    def enqueue(self, conn: sqlite3.Connection, kind: str, topic: str, payload: bytes,
                retain: bool, coalesce_key: str | None = None) -> None: ...


@dataclass(slots=True)
class AckResult:
    accepted: bool
    reason: str = ""
    job_id: str | None = None
    latency_ms: float | None = None
    first: bool = False
    not_stored: bool = False  # raised NotStored (e.g. the upstream buffer refuses new acks)
    repeat: bool = False  # a status already stored for the delivery: counted, not stored again


def _iso_utc(dt: datetime) -> str:
    """:func:`gateway.timeutil.iso` for the usual case of a time already in UTC (a parsed
    ack's ``at``), without the conversion and the replace: once per ack."""
    if dt.tzinfo is UTC:
        return dt.isoformat(timespec="milliseconds")[:-6] + "Z"
    return iso(dt)


# The batch's new rows as one JSON array (json_each walks it in order), not a statement
# step with bound values per row. ``seen`` keeps the rows new; the conflict clause only
# makes sure a repeat that got past it is counted, never a constraint error that would
# fail (and retry) the whole batch.
_INSERT = ("INSERT INTO acks(message_id, device_id, status, at, error, via, received_at) "
           "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, ? FROM json_each(?) WHERE true "
           "ON CONFLICT(message_id, status) DO UPDATE SET repeats = repeats + 1, "
           "last_received_at = excluded.received_at")


def apply_batch(conn: sqlite3.Connection, results: list[Result], acks: list[tuple[str, Ack | AckIn]], now: float,
                forward: Forwarder | None = None, acks_topic: str | None = None) -> list[AckResult]:
    """One recorder batch: the dispatcher's results, then the acks, in one transaction
    through one writer of the deliveries (the aggregates and the jobs' counts move once).

    A delivery whose "sent" result and first ack arrive in the same batch (a fast device
    acks before the result is recorded) is written once: the ack's update also records the
    send (platform, route, attempts, sent_at, as the result would have), instead of
    moving it to ``sent`` and then to ``acknowledged`` (half the row and index writes).
    What is stored is the same as applying them one by one."""
    merged: dict[str, Result] = {}
    if acks and results:
        acked = {ack.message_id for _, ack in acks}
        for r in results:
            if r.state == _IS_SENT and not r.resend and not r.invalid_key and r.message_id in acked:
                merged[r.message_id] = r
    with DeliveryWriter(conn, now) as writer:
        if results:
            writer.record([r for r in results if r.message_id not in merged] if merged else results)
        if not acks:
            return []
        out = _store_acks(writer, acks, forward, acks_topic, merged)
        if merged:  # not used by a first ack (refused, or acked before): recorded as a plain send
            writer.record(list(merged.values()))
    return out


def apply_acks(conn: sqlite3.Connection, acks: list[tuple[str, Ack | AckIn]], now: float,
               forward: Forwarder | None = None, acks_topic: str | None = None) -> list[AckResult]:
    """:func:`apply_batch` with acks only."""
    return apply_batch(conn, [], acks, now, forward, acks_topic)


def _store_acks(writer: DeliveryWriter, acks: list[tuple[str, Ack | AckIn]], forward: Forwarder | None,
                acks_topic: str | None, sends: dict[str, Result]) -> list[AckResult]:
    """Store each status of a delivery once; the first valid ack moves its delivery to
    acknowledged. Acks of the same delivery in one batch are applied in order (only the
    first moves it). With a forwarder, each new ack's copy for the cloud is queued in its
    own SAVEPOINT: one that cannot be stored (the upstream buffer raising NotStored under
    ``overflow = "refuse-new"``) is rolled back alone, not written at all and reported as
    ``not_stored``; the rest of the batch commits.

    ``sends``: "sent" results of the same batch not yet recorded; a first ack of one of
    them records the send too, and takes it out of ``sends``."""
    conn, now = writer.conn, writer.now
    rows = writer.read([ack.message_id for _, ack in acks])
    # A delivery still queued or sent has no ack stored (its first ack would have moved it):
    # its first ack here cannot be a repeat. The stored statuses are read only when an ack
    # of another delivery comes, so a fan-out's batch of first acks reads nothing more.
    seen: set[tuple[str, str]] | None = None
    repeats: dict[tuple[str, str], int] = {}
    first_acks: list[FirstAck] = []
    firsts: dict[str, str] = {}  # acknowledged by an earlier ack of this batch → its status
    out: list[AckResult] = []
    inserts: list[tuple[Any, ...]] = []
    with_nul: list[tuple[str, str, str]] = []  # (error, message_id, status): SQLite's JSON cuts a text at a NUL
    refused = 0
    forwarding = forward is not None and acks_topic is not None
    for device_id, ack in acks:
        mid = ack.message_id
        row = rows.get(mid)
        if row is None or row[1] != device_id:
            refused += 1
            out.append(AckResult(False, "unknown message_id" if row is None else "message_id was not sent to this device"))
            continue
        job_id, state, sent_at = row[0], row[2], row[5]
        first = (state == _IS_QUEUED or state == _IS_SENT) and mid not in firsts
        if not first and seen is None:
            seen = _stored_statuses(conn, rows, acks)
        if not first and (firsts.get(mid) == ack.status or (mid, ack.status) in seen):  # type: ignore[operator]
            k = (mid, ack.status)
            repeats[k] = repeats.get(k, 0) + 1
            out.append(AckResult(True, job_id=job_id, repeat=True))
            continue
        at_ts = ack.at.timestamp()
        at_iso = ack.at_text if type(ack) is Ack else _iso_utc(ack.at)
        send = sends.get(mid) if first and state == _IS_QUEUED else None
        latency = None
        if first:
            if send is not None:  # sent and acked in this batch: counted from the send, not the batch
                sent_at = send.sent_at
            base = sent_at if sent_at is not None else now
            latency = max(0.0, (at_ts - base) * 1000.0)
        if forwarding:
            payload = {"message_id": mid, "status": ack.status, "at": at_iso,
                       **({"error": ack.error} if ack.error is not None else {}),
                       "device_id": device_id, "job_id": job_id,
                       "latency_ms": round(latency, 3) if latency is not None else None}
            conn.execute("SAVEPOINT ack")
            try:
                forward.enqueue(conn, "ack", acks_topic, json.dumps(payload).encode(), False, None)  # type: ignore[union-attr]
            except NotStored as exc:
                conn.execute("ROLLBACK TO ack")
                conn.execute("RELEASE ack")
                out.append(AckResult(False, f"not stored: {exc}", not_stored=True))
                continue
            conn.execute("RELEASE ack")
        inserts.append((mid, device_id, ack.status, at_iso, ack.error, getattr(ack, "via", AckVia.MQTT)))
        if ack.error is not None and "\x00" in ack.error:
            with_nul.append((ack.error, mid, ack.status))
        if first:
            if send is not None:
                del sends[mid]
            first_acks.append((mid, at_ts, latency, send))  # type: ignore[arg-type]
            firsts[mid] = ack.status
        else:
            seen.add((mid, ack.status))  # type: ignore[union-attr]
        out.append(AckResult(True, job_id=job_id, latency_ms=latency, first=first))
    if inserts:
        conn.execute(_INSERT, (now, json.dumps(inserts)))
        if with_nul:  # the few texts the JSON array cut, written whole
            conn.executemany("UPDATE acks SET error = ? WHERE message_id = ? AND status = ?", with_nul)
    if repeats:
        conn.executemany("UPDATE acks SET repeats = repeats + ?, last_received_at = ? "
                         "WHERE message_id = ? AND status = ?", [(n, now, m, st) for (m, st), n in repeats.items()])
        jobs.bump(conn, "acks_repeated", sum(repeats.values()))
    if inserts or repeats:
        jobs.bump(conn, "acks_stored", len(inserts) + sum(repeats.values()))
    if refused:
        jobs.bump(conn, "acks_refused", refused)
    writer.acknowledge(first_acks)
    return out


def _stored_statuses(conn: sqlite3.Connection, rows: dict[str, list[Any]],
                     acks: list[tuple[str, Ack | AckIn]]) -> set[tuple[str, str]]:
    """(message_id, status) already stored for the batch's deliveries that are past their
    first ack (acknowledged, or finished otherwise)."""
    past = [mid for _, ack in acks if (row := rows.get(mid := ack.message_id)) is not None
            and row[2] != "queued" and row[2] != "sent"]
    if not past:
        return set()
    return {(r[0], r[1]) for r in conn.execute(
        "SELECT message_id, status FROM acks WHERE message_id IN (SELECT value FROM json_each(?))",
        (json.dumps(past),))}


def acks_of(conn: sqlite3.Connection, message_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """message_id → its stored acks in arrival order: each status once, with ``at`` (the
    device's time of the first) and ``repeats`` (later acks of that status, not stored).
    For a page of deliveries (up to a few hundred ids: one bound value each)."""
    found: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    if message_ids:  # sorted here: a page's few rows, not a sort in SQLite
        for r in conn.execute("SELECT message_id, id, status, at, repeats FROM acks WHERE message_id IN "
                              f"({','.join('?' * len(message_ids))})", message_ids):
            found.setdefault(r[0], []).append((r[1], {"status": r[2], "at": r[3], "repeats": r[4]}))
    return {m: [a for _, a in sorted(rows, key=lambda x: x[0])] for m, rows in found.items()}


def acks_of_job(conn: sqlite3.Connection, job_id: str) -> dict[str, list[dict[str, Any]]]:
    """message_id → stored acks (as :func:`acks_of`) of every delivery of a job."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute("SELECT a.message_id, a.status, a.at, a.repeats FROM deliveries d JOIN acks a "
                          "ON a.message_id = d.message_id WHERE d.job_id = ? ORDER BY a.id", (job_id,)):
        out.setdefault(r[0], []).append({"status": r[1], "at": r[2], "repeats": r[3]})
    return out


def delete_of(conn: sqlite3.Connection, message_ids: list[str]) -> None:
    """Delete the acks of deliveries (retention, before the deliveries go)."""
    if message_ids:
        conn.execute("DELETE FROM acks WHERE message_id IN (SELECT value FROM json_each(?))", (json.dumps(message_ids),))



def last_of_device(conn: sqlite3.Connection, device_id: str) -> sqlite3.Row | None:
    """The latest ack a device's deliveries received: status, at, received_at, message_id,
    via (the channel it came by; NULL on a database from before it was kept) and job_id."""
    via = "a.via" if "via" in {r[1] for r in conn.execute("PRAGMA table_info(acks)")} else "NULL"
    return conn.execute(f"SELECT a.status, a.at, a.received_at, a.message_id, {via} AS via, d.job_id FROM acks a "
                        "JOIN deliveries d ON d.message_id = a.message_id WHERE d.device_id = ? "
                        "ORDER BY a.received_at DESC LIMIT 1", (device_id,)).fetchone()

__all__ = ["AckResult", "Forwarder", "acks_of", "acks_of_job", "apply_acks", "apply_batch", "delete_of", "last_of_device"]
