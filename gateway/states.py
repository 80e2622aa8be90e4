"""The states a job and a delivery go through (contract §6, §7), named once.

Each is a :class:`enum.StrEnum`: a member is the string the database, the JSON and MQTT
carry (``JobState.COMPLETED == "completed"``), so rows and payloads need no conversion and
code never spells a state by hand. The SQL that filters on states (an index's ``WHERE``)
writes them out because SQLite needs literals there; those must match these.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    ACCEPTED = "accepted"
    DISPATCHING = "dispatching"
    COMPLETED = "completed"  # nothing queued: every delivery sent or final
    ACKNOWLEDGED = "acknowledged"  # every target acked
    REJECTED = "rejected"  # invalid; never dispatched


# A job in one of these never changes again (retention prunes it, event streams end).
FINAL_JOB_STATES = frozenset({JobState.COMPLETED, JobState.ACKNOWLEDGED, JobState.REJECTED})


class DeliveryState(StrEnum):
    """In the order the counts are shown (``JobStatus.counts``, ``status``, the page)."""

    QUEUED = "queued"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    EXPIRED = "expired"
    INVALID_ADDRESS = "invalid_address"
    SUPPRESSED = "suppressed"  # final: the person it was for muted its segment or alarm rule (§12)


class ReachState(StrEnum):
    """Where a person of a job that targets people stands (``job_people.state``, §12)."""

    REACHING = "reaching"  # their devices are being tried, in order
    REACHED = "reached"  # one of their devices acked
    UNKNOWN = "unknown"  # no such person when the job was expanded
    NO_DEVICES = "no_devices"  # the person lists no device
    REMOVED = "removed"  # removed from the registry while being reached


DELIVERY_STATES: tuple[DeliveryState, ...] = tuple(DeliveryState)
# Deliveries that went wrong: a send with one of these fails the CLI's exit code.
PROBLEM_DELIVERY_STATES = (DeliveryState.FAILED, DeliveryState.EXPIRED, DeliveryState.INVALID_ADDRESS)
# Deliveries that will never be sent and are not a problem: the person asked not to get them.
QUIET_DELIVERY_STATES = (DeliveryState.SUPPRESSED,)

__all__ = ["DELIVERY_STATES", "FINAL_JOB_STATES", "PROBLEM_DELIVERY_STATES", "QUIET_DELIVERY_STATES",
           "DeliveryState", "JobState", "ReachState"]
