"""The jobs an alarm submits: their ids and their bodies.

An alarm's jobs are ordinary jobs (contract §6), so every bridge, fallback, retry, TTL and
ack rule applies to them. Their ids are ``alarm.<rule>.<key>.<n>`` (contract §11), ``n``
counting the alarm's jobs (firing, each escalation step, clearing) from 1, and every
character outside ``[A-Za-z0-9._:-]`` replaced by ``_``.

Job ids are at most 64 characters. When ``alarm.<rule>.<key>.<n>`` would be longer, it
is cut and ends in ``-<h>.<n>``, where ``<h>`` is the first 10 hex digits of SHA-256 over
``<rule> NUL <key>``: the same alarm always gets the same prefix, two long keys that
share their first characters do not, and ``n`` stays readable at the end.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.pipeline.models import ParsedJob, parse_job

MAX_JOB_ID = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
MAX_TITLE = 1024
MAX_BODY = 4096


def job_id_for(rule: str, key: str, n: int) -> str:
    full = _UNSAFE.sub("_", f"alarm.{rule}.{key}.{n}")
    if len(full) <= MAX_JOB_ID:
        return full
    digest = hashlib.sha256(f"{rule}\0{key}".encode()).hexdigest()[:10]
    tail = f"-{digest}.{n}"
    head = _UNSAFE.sub("_", f"alarm.{rule}.{key}")
    return head[:MAX_JOB_ID - len(tail)] + tail


@dataclass
class JobPlan:
    """A job the engine decided to submit; the store gives it an id in the same
    transaction as the alarm's new state."""

    kind: str  # fire | escalate | clear
    episode: int
    target: dict[str, Any] | None  # None: everyone notified in this episode (clearing)
    title: str
    body: str
    priority: str
    data: dict[str, str]
    # The episode's job ids: the store appends this plan's id to it, and a clearing plan
    # reads it to find everyone notified. One list object per episode.
    episode_jobs: list[str] = field(default_factory=list)


def build_job(job_id: str, plan: JobPlan, target: dict[str, Any]) -> ParsedJob:
    """Validated like any incoming job (the pipeline's own model); raises InputError."""
    return parse_job({
        "job_id": job_id,
        "target": target,
        "notification": {"title": plan.title[:MAX_TITLE], "body": plan.body[:MAX_BODY],
                         "priority": plan.priority, "data": plan.data},
    })
