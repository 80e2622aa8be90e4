"""The states a job, a delivery and an alarm go through (contract §6, §7, §11), named once.

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



class AlarmState(StrEnum):
    """An alarm record's state (``alarms.state``); ``idle`` is a watch that is not alarming
    (kept for its timers, never shown)."""

    IDLE = "idle"
    PENDING = "pending"  # the condition holds, for_s not yet over
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"  # firing, and an operator has seen it
    CLEARED = "cleared"


# The states an alarm is shown and counted in (status, /metrics, the page), in the order
# ``status`` and ``/metrics`` list them.
ALARM_STATES: tuple[AlarmState, ...] = (AlarmState.PENDING, AlarmState.FIRING, AlarmState.ACKNOWLEDGED,
                                        AlarmState.CLEARED)
# The alarm is in an episode: the condition held (pending) or fired and has not cleared.
ACTIVE_ALARM_STATES = frozenset({AlarmState.PENDING, AlarmState.FIRING, AlarmState.ACKNOWLEDGED})

__all__ = ["ACTIVE_ALARM_STATES", "ALARM_STATES", "DELIVERY_STATES", "FINAL_JOB_STATES", "PROBLEM_DELIVERY_STATES",
           "QUIET_DELIVERY_STATES", "AlarmState", "DeliveryState", "JobState", "ReachState"]
