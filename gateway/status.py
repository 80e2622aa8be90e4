"""``homepot-gateway status [--json]`` (contract §3): the running gateway at a glance.

Works without ``[http]`` and from another process or user: it reads the daemon's runtime
snapshot (``<data_dir>/runtime.json``, see :mod:`gateway.health`) and the database, read
only. It never creates a file there: the database is opened ``mode=ro`` while the daemon's
``-wal``/``-shm`` files exist, and ``immutable`` when they do not (no daemon writes then),
so a root shell cannot leave root-owned files in the service's data dir.

Exit codes: 0 healthy, 1 degraded (a check fails), 2 unreachable (no daemon, or its
snapshot is stale).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway import clock, health, stats
from gateway.alarms.summary import summary as alarm_summary
from gateway.config import Config
from gateway.pipeline import jobs
from gateway.states import DELIVERY_STATES, DeliveryState
from gateway.upstream import outbox

EXIT = {"ok": 0, "degraded": 1, "unreachable": 2}
# The deliveries table's columns; ``suppressed`` (muted by the person) is one total under it,
# so the table stays within 80 columns with 7-digit counts.
STATES = tuple(s.value for s in DELIVERY_STATES if s is not DeliveryState.SUPPRESSED)
SHORT = {DeliveryState.ACKNOWLEDGED: "acked", DeliveryState.INVALID_ADDRESS: "invalid"}  # `status` headings


def open_readonly(db_path: Path) -> sqlite3.Connection | None:
    if not db_path.exists():
        return None
    wal = db_path.with_name(db_path.name + "-wal")
    shm = db_path.with_name(db_path.name + "-shm")
    mode = "mode=ro" if wal.exists() and shm.exists() else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"file:{db_path}?{mode}", uri=True, timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def collect(cfg: Config, now: float | None = None) -> dict[str, Any]:
    given = now
    now = time.time() if now is None else now  # the snapshot file's written_at is wall-clock time
    snap, why = health.read_snapshot(cfg.data_dir, now)
    out: dict[str, Any] = {"site_id": cfg.gateway.site_id}
    if snap is None or why:
        out["status"], out["reason"] = "unreachable", why
    else:
        out["status"] = snap.get("status") or health.verdict(snap)[0]
        out["reason"] = "; ".join(f"{k}: {v['detail']}" for k, v in (snap.get("checks") or {}).items() if not v.get("ok"))
    if snap is not None and not why:
        out["daemon"] = {"pid": snap.get("pid"), "version": snap.get("version"), "started_at": snap.get("started_at"),
                         "snapshot_age_s": round(now - float(snap.get("written_at", now)), 1)}
        out["checks"] = snap.get("checks") or {}
        broker = snap.get("broker") or {}
        out["broker"] = {"mode": (snap.get("broker_client") or {}).get("mode"),
                         "client_connected": (snap.get("broker_client") or {}).get("connected"),
                         "clients_connected": broker.get("clients_connected"), "sessions": broker.get("sessions"),
                         "messages_dropped": broker.get("dropped"),
                         "devices_connected": sum(1 for p in (snap.get("presence") or {}).values() if p.get("connected"))}
        out["bridges"] = snap.get("bridges") or {}
        out["upstream"] = snap.get("upstream")
        out["set_aside"] = snap.get("set_aside") or {"counts": {}, "recent": []}
    else:
        # Without a live daemon its last checks would only mislead: say when it was last seen.
        out.update(daemon=None, checks={}, broker=None, bridges={}, upstream=None, set_aside=None)
        if snap is not None:
            out["last_seen"] = {"pid": snap.get("pid"), "version": snap.get("version"),
                                "written_at": snap.get("written_at")}
    conn = open_readonly(cfg.db_path)
    out["deliveries"], out["oldest_queued_age_s"], out["alarms_firing"] = {}, None, None
    if conn is not None:
        try:
            conn.execute("BEGIN")
            clock.attach(conn)  # stored times are on the daemon's clock (gateway.clock)
            out["deliveries"] = _deliveries(conn)
            if stats.has_table(conn, "jobs"):
                created = jobs.oldest_with_queued(conn)
                at = clock.now() if given is None else given
                out["oldest_queued_age_s"] = _round(None if created is None else max(0.0, at - created))
            backlog = outbox.backlog(conn)
            if backlog is not None:
                out["upstream"] = {**(out.get("upstream") or {}), **backlog}
            alarms = alarm_summary(conn)
            out["alarms_firing"] = None if alarms is None else [
                {k: a[k] for k in ("rule", "key", "value", "since", "fired_at")}
                for a in sorted(alarms.firing, key=lambda a: (a["rule"], a["key"]))]
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            out["database_error"] = str(exc)
        finally:
            conn.close()
    return out


def _deliveries(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    if stats.has_table(conn, "delivery_stats"):
        counts = stats.delivery_counts(conn)
    elif stats.has_table(conn, "deliveries"):  # a database the daemon has not opened since upgrading
        counts = stats.counted(conn)
    else:
        counts = {}
    out: dict[str, dict[str, int]] = {}
    for (platform, state), n in sorted(counts.items()):
        out.setdefault(platform or "unassigned", {})[state] = n
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def render(info: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    colour = {"ok": "green", "degraded": "yellow", "unreachable": "red"}[info["status"]]
    head = f"[bold]{info['site_id']}[/]  [{colour}]{info['status'].upper()}[/]"
    daemon = info.get("daemon")
    if daemon:
        head += f"  pid {daemon['pid']}  v{daemon['version']}  since {daemon['started_at']}"
    console.print(head)
    if info.get("reason"):
        console.print(f"  [{colour}]{info['reason']}[/]")
    if info.get("checks"):
        t = Table(title="checks", title_justify="left")
        t.add_column("check")
        t.add_column("")
        t.add_column("detail")
        for name, c in info["checks"].items():
            t.add_row(name, "[green]ok[/]" if c.get("ok") else "[red]FAIL[/]", str(c.get("detail", "")))
        console.print(t)
    if info.get("broker"):
        b = info["broker"]
        console.print(f"broker ({b.get('mode')}): gateway client {'connected' if b.get('client_connected') else 'NOT connected'}"
                      + (f", {b['clients_connected']} clients ({b.get('devices_connected', 0)} devices), "
                         f"{b['sessions']} sessions, {b['messages_dropped']} dropped"
                         if b.get("clients_connected") is not None else ""))
    if info.get("bridges"):
        t = Table(title="bridges", title_justify="left")
        for col in ("platform", "health", "in flight", "sent", "reason"):
            t.add_column(col)
        for name, br in sorted(info["bridges"].items()):
            t.add_row(name, "[green]healthy[/]" if br.get("healthy") else "[red]unhealthy[/]",
                      str(br.get("in_flight", "")), str(br.get("sent", "")), br.get("reason") or "")
        console.print(t)
    # Short headings and no vertical rules: seven columns fit 80 columns with 7-digit counts.
    t = Table(title="deliveries", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("platform")
    for state in STATES:
        t.add_column(SHORT.get(state, state), justify="right")
    for platform, by_state in sorted(info.get("deliveries", {}).items()):
        t.add_row(platform, *(str(by_state.get(s, 0)) for s in STATES))
    console.print(t)
    muted = sum(by_state.get(DeliveryState.SUPPRESSED, 0) for by_state in info.get("deliveries", {}).values())
    if muted:
        console.print(f"suppressed (muted by the person they were for): {muted}")
    oldest = info.get("oldest_queued_age_s")
    console.print(f"oldest queued delivery: {'none queued' if oldest is None else f'{oldest:.0f} s'}")
    up = info.get("upstream")
    if up:
        console.print(f"upstream: {'connected' if up.get('connected') else 'NOT connected'}, backlog "
                      f"{up.get('buffer_rows', '?')} messages / {up.get('buffer_bytes', '?')} bytes, oldest "
                      f"{_age(up.get('buffer_oldest_age_s'))}, drain {_rate(up.get('drain_rate'))}")
    aside = info.get("set_aside")
    if aside and any(aside.get("counts", {}).values()):
        counts = ", ".join(f"{n} from the {link} link" for link, n in sorted(aside["counts"].items()) if n)
        console.print(f"[yellow]messages set aside (handling failed; acknowledged, not processed): {counts}[/]")
        for m in aside.get("recent", [])[-5:]:
            console.print(f"  {m.get('at')} {m.get('link')} {m.get('topic')!r} ({m.get('size')} bytes): {m.get('reason')}")
    alarms = info.get("alarms_firing")
    if alarms is None:
        console.print("alarms: none configured")
    elif not alarms:
        console.print("alarms: none firing")
    else:
        console.print(f"[red]alarms firing: {len(alarms)}[/]")
        for a in alarms:
            console.print("  " + " ".join(f"{k}={v}" for k, v in a.items()))


def _age(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.0f} s"


def _rate(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.1f}/s"


def main(cfg: Config, as_json: bool) -> int:
    info = collect(cfg)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        render(info)
    return EXIT[info["status"]]


__all__ = ["collect", "main", "open_readonly"]
