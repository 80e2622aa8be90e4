"""MQTT topic names of the contract (§5) and filter matching."""

from __future__ import annotations

from dataclasses import dataclass


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7 matching; '$' topics never match a leading wildcard [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("#", "+"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(t_levels) == len(f_levels)


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic and len(topic.encode()) <= 65535


@dataclass(frozen=True)
class Topics:
    """The topics of one site; ``prefix`` is ``<topic_prefix>/<site_id>`` (P)."""

    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}/jobs"

    def job_status(self, job_id: str) -> str:
        return f"{self.prefix}/jobs/{job_id}/status"

    def device_register(self, device_id: str = "+") -> str:
        return f"{self.prefix}/devices/{device_id}/register"

    def device_notify(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/notify"

    def device_ack(self, device_id: str = "+") -> str:
        return f"{self.prefix}/devices/{device_id}/ack"

    @property
    def gateway_status(self) -> str:
        return f"{self.prefix}/gateway/status"

    @property
    def gateway_errors(self) -> str:
        return f"{self.prefix}/gateway/errors"

    @property
    def acks(self) -> str:
        return f"{self.prefix}/acks"

    def device_id_of(self, topic: str) -> str | None:
        """``P/devices/<id>/...`` → ``<id>``."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        device_id, sep, _ = rest.partition("/")
        return device_id if sep else None
