"""The pipeline's SQL, gathered for the callers that use several of its tables (the
dispatcher, the recorder, the status publisher, the CLI, the HTTP API). Each table has its
own module, and new code should import that one:

- :mod:`gateway.pipeline.registry`: ``devices`` (registrations, invalid marks);
- :mod:`gateway.pipeline.routing`: which channel a delivery uses (no SQL);
- :mod:`gateway.pipeline.jobs`: ``jobs``, ``status_clears``, ``counters``;
- :mod:`gateway.pipeline.deliveries`: ``deliveries``, written only by its
  :class:`~gateway.pipeline.deliveries.DeliveryWriter`, and the reads of due work;
- :mod:`gateway.pipeline.acks`: ``acks``, and a recorder batch as one write;
- :mod:`gateway.pipeline.retention`: pruning finished jobs.

Everything runs inside one transaction per call: on the daemon's database thread (via
``Database.run``) or in the CLI process. Nothing here awaits or logs; callers decide.
"""

from __future__ import annotations

import sqlite3

from gateway import clock
from gateway.pipeline import jobs
from gateway.pipeline.acks import AckResult, Forwarder, acks_of, apply_acks, apply_batch
from gateway.pipeline.deliveries import (
    FINAL_DELIVERY_STATES,
    DeliveryWriter,
    DueDelivery,
    Result,
    delivery_rows,
    due_deliveries,
    due_for_route,
    expand_page,
    expiring,
    movable_for_route,
    new_message_id,
    new_message_ids,
    next_due_at,
    next_due_for_route,
    unexplained_for_route,
    unrouted_due,
    wait_reason,
)
from gateway.pipeline.jobs import (
    COUNT_KEYS,
    FINAL_JOB_STATES,
    bump,
    clears_done,
    counters,
    insert_job,
    job_rows,
    job_status,
    jobs_to_expand,
    list_jobs,
    mark_dirty,
    next_expiry,
    owed_clears,
    reject_job,
    rejected_status,
    settle_jobs,
    status_from_row,
    submit_job,
)
from gateway.pipeline.registry import (
    count_targets,
    device_json,
    get_device,
    iter_devices,
    mark_invalid,
    remove_device,
    upsert_device,
    upsert_devices,
)
from gateway.pipeline.retention import prune
from gateway.pipeline.routing import ChannelCache, ChannelList, Route, channel_for, channel_key, choose_channel


def apply_results(conn: sqlite3.Connection, results: list[Result], now: float) -> None:
    """The dispatcher's results of one batch (:meth:`DeliveryWriter.record`)."""
    with DeliveryWriter(conn, now) as writer:
        writer.record(results)


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the pipeline's pending deadlines by ``delta`` s (gateway.clock re-anchored): the
    deliveries' due and resend times (:meth:`DeliveryWriter.shift_deadlines`) and the jobs'
    TTL expiry and status throttles (:func:`gateway.pipeline.jobs.shift_deadlines`). Times
    of what already happened (created_at, sent_at, acked_at, updated_at) are not moved."""
    with DeliveryWriter(conn, clock.now()) as writer:
        moved = writer.shift_deadlines(delta)
    return moved + jobs.shift_deadlines(conn, delta)


__all__ = ["COUNT_KEYS", "FINAL_DELIVERY_STATES", "FINAL_JOB_STATES", "AckResult", "ChannelCache", "ChannelList",
           "DeliveryWriter", "DueDelivery", "Forwarder", "Result", "Route", "acks_of", "apply_acks", "apply_batch",
           "apply_results", "bump", "channel_for", "channel_key", "choose_channel", "clears_done", "count_targets",
           "counters", "delivery_rows", "device_json", "due_deliveries", "due_for_route", "expand_page", "expiring",
           "get_device", "insert_job", "iter_devices", "job_rows", "job_status", "jobs_to_expand", "list_jobs",
           "mark_dirty", "mark_invalid", "movable_for_route", "new_message_id", "new_message_ids", "next_due_at", "next_due_for_route",
           "next_expiry", "owed_clears", "prune", "reject_job", "rejected_status", "remove_device", "settle_jobs", "shift_deadlines",
           "status_from_row", "submit_job", "unexplained_for_route", "unrouted_due", "wait_reason", "upsert_device", "upsert_devices"]
