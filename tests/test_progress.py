"""The CLI's `send --wait` summary, in process: what a technician reads when a job ends."""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from gateway.progress import wait_for_job

COUNTS = {"targets": 0, "queued": 0, "sent": 0, "acknowledged": 0, "failed": 0, "expired": 0,
          "invalid_address": 0, "suppressed": 0}


def _wait(status: dict) -> tuple[int, str]:
    out = io.StringIO()
    code = wait_for_job(None, "j-1", 5.0, "completed", lambda _conn, _id: status, lambda: True, Path("var"),  # type: ignore[arg-type]
                        console=Console(file=out, width=200))
    return code, out.getvalue()


def test_a_job_that_reached_nobody_says_why():
    why = "target.people: no such person, or none of them lists a device"
    code, text = _wait({"state": "completed", "counts": COUNTS, "error": {"code": "no_targets", "message": why}})
    assert f"no targets: {why}" in text and "completed: targets=0" in text
    assert code == 0  # contract §3: nothing failed, expired or hit an invalid address


def test_a_job_with_targets_prints_only_its_summary():
    code, text = _wait({"state": "completed", "counts": COUNTS | {"targets": 1, "sent": 1}, "error": None})
    assert "no targets" not in text and "completed: targets=1 sent=1" in text and code == 0
