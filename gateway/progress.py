"""``send --wait``: a live bar over the job's deliveries, read from SQLite.

Done counts deliveries that reached the state the operator waits for — out of the queue
for ``--until completed`` (contract §6: nothing queued any more), final for ``--until
acknowledged`` (acked, or failed/expired/invalid so it never will be) — out of the job's
targets, with the count per state, the rate over the last seconds and an ETA. The bar is
drawn on stderr only when it is a terminal; the summary line and the exit code are the
same either way, so scripts and tests read them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from gateway.states import PROBLEM_DELIVERY_STATES, QUIET_DELIVERY_STATES, JobState

Until = Literal["completed", "acknowledged"]
_SHORT = {"queued": "queued", "sent": "sent", "acknowledged": "acked", "failed": "failed",
          "expired": "expired", "invalid_address": "invalid", "suppressed": "muted"}


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column counts bytes)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "–/s", style="progress.data.speed")


def progress_bar(console: Console, *extra: ProgressColumn) -> Progress:
    """The CLI's one bar: done of total, percent, extra columns, rate, elapsed and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), *extra, RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False, speed_estimate_period=10,
                    disable=not console.is_terminal)


def done_count(counts: dict[str, int], until: Until) -> int:
    if until == "acknowledged":
        return counts["acknowledged"] + sum(counts.get(s, 0) for s in PROBLEM_DELIVERY_STATES + QUIET_DELIVERY_STATES)
    return counts["targets"] - counts["queued"]


def finished(status: dict[str, Any], until: Until) -> bool:
    state, c = status["state"], status["counts"]
    if state in (JobState.REJECTED, JobState.ACKNOWLEDGED):
        return True
    if until == "completed":
        return state == JobState.COMPLETED
    # Every delivery final, though not every one acked: "acknowledged" will never come.
    return state == JobState.COMPLETED and c["sent"] == 0


def summary(status: dict[str, Any]) -> str:
    c = status["counts"]
    return (f"{status['state']}: targets={c['targets']} sent={c['sent']} acknowledged={c['acknowledged']} "
            f"failed={c['failed']} expired={c['expired']} invalid_address={c['invalid_address']}"
            + (f" suppressed={c['suppressed']}" if c.get("suppressed") else ""))


def exit_code(status: dict[str, Any], until: Until) -> int:
    """0 if no delivery failed, expired or hit an invalid address (and, for --until
    acknowledged, every target acked), else 1 (contract §3)."""
    c = status["counts"]
    if status["state"] == JobState.REJECTED or any(c[s] for s in PROBLEM_DELIVERY_STATES):
        return 1
    if until == "acknowledged" and status["state"] != JobState.ACKNOWLEDGED:
        return 1
    return 0


def wait_for_job(conn: sqlite3.Connection, job_id: str, timeout: float, until: Until,
                 read_status: Callable[[sqlite3.Connection, str], dict[str, Any] | None],
                 daemon_running: Callable[[], bool], data_dir: Path, console: Console | None = None) -> int:
    """Draw the bar until the job is done, the timeout passes or the daemon goes away."""
    console = console or Console(stderr=True)
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    next_daemon_check = time.monotonic() + 1.0
    counts_text = TextColumn("{task.fields[counts]}")
    with progress_bar(console, counts_text) as bar:
        task = bar.add_task(job_id, total=None, counts="waiting for the daemon")
        while True:
            status = read_status(conn, job_id)
            if status is not None:
                c = status["counts"]
                shown = "  ".join(f"{_SHORT[k]} {c.get(k, 0)}" for k in _SHORT if c.get(k) or k in ("queued", "acknowledged"))
                bar.update(task, total=c["targets"] or None, completed=done_count(c, until),
                           counts=f"{status['state']}  {shown}")
                if finished(status, until):
                    break
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_daemon_check:
                next_daemon_check = now + 1.0
                if not daemon_running():
                    console.print(f"the gateway daemon on {data_dir} stopped; job {job_id} is stored and "
                                  "resumes when it starts again", style="yellow", highlight=False, markup=False, soft_wrap=True)
                    return 1
            time.sleep(0.2)
    if status is None or not finished(status, until):
        what = "acknowledged" if until == "acknowledged" else "complete"
        console.print(f"timeout: job {job_id} not {what} after {timeout:g} s"
                      + (f" ({summary(status)})" if status else ""), highlight=False, soft_wrap=True, markup=False)
        return 1
    err = status.get("error") or {}
    if status["state"] == JobState.REJECTED and err:
        console.print(f"rejected: {err.get('code')}: {err.get('message')}", highlight=False, soft_wrap=True, markup=False)
    elif err.get("code") == "no_targets":  # a job that reached nobody says why, not only "targets=0"
        console.print(f"no targets: {err.get('message')}", highlight=False, soft_wrap=True, markup=False)
    console.print(summary(status), highlight=False, soft_wrap=True, markup=False)
    return exit_code(status, until)


__all__ = ["RateColumn", "progress_bar", "wait_for_job", "summary", "exit_code", "finished", "done_count"]
