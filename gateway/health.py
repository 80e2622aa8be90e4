"""One health model for ``GET /healthz``, ``/metrics`` and ``homepot-gateway status``.

The daemon's :class:`HealthReporter` service builds a *runtime snapshot* every
:data:`INTERVAL_S`: event-loop lag, a database round trip, the gateway's broker client,
each bridge's health, the embedded broker's and the cloud link's counters. It keeps the
latest in memory (for the HTTP API) and writes it to ``<data_dir>/runtime.json`` (atomic
rename, no fsync: it is a view, not state), so ``status`` works without ``[http]`` and
from another process. A snapshot older than :data:`STALE_S`, one marked ``stopped``, or
none at all means the daemon is unreachable.

:func:`checks` turns a snapshot into the verdict all three report: the contract's four
checks (loop, database, broker client, bridges); the cloud link and alarms are shown but
do not make the gateway unhealthy (a WAN outage is what the store-and-forward is for).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from gateway import __version__, setaside, stats
from gateway.config import Config
from gateway.setaside import SetAside
from gateway.storage import Database

if TYPE_CHECKING:  # annotations only: `devices list` reads the snapshot without the MQTT client
    from gateway.broker.presence import Presence
    from gateway.mqtt import GatewayClient

log = structlog.get_logger(__name__)

INTERVAL_S = 2.0
STALE_S = 10.0  # five missed snapshots: the daemon is gone or its loop is stuck
LOOP_LAG_LIMIT_S = 1.0
DB_TIMEOUT_S = 5.0
SNAPSHOT_NAME = "runtime.json"


def snapshot_path(data_dir: Path) -> Path:
    return data_dir / SNAPSHOT_NAME


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def checks(snap: dict[str, Any]) -> list[Check]:
    """The contract's checks on a runtime snapshot (§10 ``/healthz``)."""
    out: list[Check] = []
    lag = snap.get("loop_lag_s")
    out.append(Check("loop", isinstance(lag, (int, float)) and lag < LOOP_LAG_LIMIT_S,
                     f"lag {lag:.3f} s" if isinstance(lag, (int, float)) else "not measured yet"))
    db = snap.get("database") or {}
    out.append(Check("database", bool(db.get("ok")),
                     db.get("error") or (f"round trip {db.get('latency_ms', 0):.1f} ms" if db.get("ok") else "unknown")))
    client = snap.get("broker_client") or {}
    out.append(Check("broker", bool(client.get("connected")),
                     "connected" if client.get("connected") else f"not connected: {client.get('last_error') or '?'}"))
    bridges = snap.get("bridges") or {}
    bad = {name: b.get("reason") or "unhealthy" for name, b in bridges.items() if not b.get("healthy", True)}
    out.append(Check("bridges", not bad, "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or
                     f"{len(bridges)} healthy"))
    return out


def verdict(snap: dict[str, Any]) -> tuple[str, list[Check]]:
    found = checks(snap)
    return ("ok" if all(c.ok for c in found) else "degraded"), found


# ------------------------------------------------------------------ reading (status CLI)
def read_snapshot(data_dir: Path, now: float | None = None) -> tuple[dict[str, Any] | None, str]:
    """The daemon's last snapshot and why it is not usable ('' when it is)."""
    path = snapshot_path(data_dir)
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no daemon has run with this data_dir ({path} is missing)"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    if not isinstance(snap, dict):
        return None, f"{path}: not a snapshot"
    now = time.time() if now is None else now
    if snap.get("state") == "stopped":
        return snap, "the daemon stopped at " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("written_at", 0)))
    age = now - float(snap.get("written_at", 0))
    if age > STALE_S:
        return snap, f"the daemon's last snapshot is {age:.0f} s old (stuck or killed)"
    pid = snap.get("pid")
    if isinstance(pid, int) and not _alive(pid):
        return snap, f"the daemon (pid {pid}) is not running"
    return snap, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's (the service account)
    return True


# ------------------------------------------------------------------ what it probes
class MetricsProbe(Protocol):
    """A part whose counters the snapshot shows (the embedded broker, the cloud link)."""

    def metrics(self) -> Mapping[str, Any]: ...


class BridgeProbe(Protocol):
    """Per bridge: healthy, reason, paused_for_s, in_flight, sent (the pipeline)."""

    def bridge_health(self) -> dict[str, dict[str, Any]]: ...


@dataclass(frozen=True)
class BoundPorts:
    """The ports the daemon listens on: each broker listener by name, and the HTTP API
    (None without ``[http]``). A ``bind`` with port 0 shows the port the kernel picked."""

    broker: dict[str, int]
    http: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"broker": dict(self.broker), "http": self.http}


@dataclass(frozen=True)
class HealthProbes:
    """What the reporter looks at besides the database: the gateway's broker client, and
    the parts that exist in this configuration (None: not running here)."""

    client: GatewayClient
    started_at: str
    broker: MetricsProbe | None = None
    bridges: BridgeProbe | None = None
    upstream: MetricsProbe | None = None
    ports: Callable[[], BoundPorts] | None = None  # runtime.json "ports"
    presence: Presence | None = None  # device accounts on the embedded broker
    upstream_set_aside: SetAside | None = None  # the cloud link's set-aside messages


# ------------------------------------------------------------------ the reporter service
class HealthReporter:
    """Service ``health``: measures, keeps :attr:`latest`, writes ``runtime.json``."""

    name = "health"

    def __init__(self, cfg: Config, db: Database, probes: HealthProbes, interval: float = INTERVAL_S):
        self.cfg = cfg
        self.db = db
        self.probes = probes
        self.interval = interval
        self.path = snapshot_path(cfg.data_dir)
        self.loop_lag = 0.0
        self.database: dict[str, Any] = {"ok": False, "error": "not checked yet"}
        self.latest: dict[str, Any] = {}
        self._published: tuple[float, float] | None = None  # (time, upstream published) for a rate
        self.upstream_drain_rate: float | None = None
        self._write_error: str | None = None
        # Set after the first refresh: READY=1 waits for it (daemon._services_started), so a
        # /healthz right after READY never reports "database: not checked yet".
        self.started = asyncio.Event()
        self._write_lock = asyncio.Lock()

    def attach(self, client: GatewayClient) -> None:
        """Nothing to route: the reporter only reads (its client is in :attr:`probes`)."""

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                await self.refresh()
                self.started.set()
                try:
                    await self._write_latest()
                    self._write_error = None
                except OSError as exc:  # a full disk must not stop the daemon; `status` will say stale
                    if str(exc) != self._write_error:
                        log.warning("runtime snapshot not written", path=str(self.path), error=str(exc))
                    self._write_error = str(exc)
                # Lag: how late the loop wakes us compared with when we asked.
                asked = self.interval
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(stopping.wait(), asked)
                except TimeoutError:
                    pass
                if not stopping.is_set():
                    self.loop_lag = max(0.0, time.monotonic() - t0 - asked)
        finally:
            final = dict(self.latest or self.snapshot(), state="stopped", written_at=time.time())
            try:
                await asyncio.to_thread(self._write, final)
            except OSError as exc:
                log.warning("runtime snapshot not written at stop", error=str(exc))

    async def refresh(self) -> dict[str, Any]:
        """Measure the database and rebuild :attr:`latest`."""
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.db.run(lambda conn: conn.execute("SELECT 1").fetchone()), DB_TIMEOUT_S)
            self.database = {"ok": True, "latency_ms": (time.perf_counter() - t0) * 1000, "error": None}
        except TimeoutError:
            self.database = {"ok": False, "error": f"no answer within {DB_TIMEOUT_S:g} s"}
        except Exception as exc:  # the verdict, not a crash: a broken database is what we report
            self.database = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        self.latest = self.snapshot()
        return self.latest

    async def publish(self) -> None:
        """Measure and write ``runtime.json`` now (the daemon calls it once before READY=1)."""
        await self.refresh()
        await self._write_latest()

    async def _write_latest(self) -> None:
        # One write at a time, of the newest snapshot when its turn comes: the loop's write
        # of an older one can never land after (and hide) the one made before READY=1.
        async with self._write_lock:
            await asyncio.to_thread(self._write, self.latest)

    def snapshot(self) -> dict[str, Any]:
        cfg, probes = self.cfg, self.probes
        client = probes.client
        snap: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "version": __version__,
            "site_id": cfg.gateway.site_id,
            "started_at": probes.started_at,
            "written_at": time.time(),
            "loop_lag_s": round(self.loop_lag, 4),
            "database": self.database,
            "broker_client": {"connected": client.connected, "url": cfg.broker.url, "mode": cfg.broker.mode,
                              "last_error": client.last_error},
            "broker": _metrics_of(probes.broker),
            # Device accounts seen on the embedded broker: device_id → connected, since, last_seen.
            "presence": _presence_of(probes.presence),
            "bridges": probes.bridges.bridge_health() if probes.bridges is not None else {},
            "set_aside": set_aside_view(probes),
            "upstream": self._upstream(),
            "http": ({"bind": cfg.http.bind, "url": cfg.http.base_url()} if cfg.http is not None else None),
            "ports": probes.ports().as_dict() if probes.ports is not None else None,
        }
        status, found = verdict(snap)
        snap["status"] = status
        snap["checks"] = {c.name: c.as_dict() for c in found}
        return snap

    def _upstream(self) -> dict[str, Any] | None:
        link = self.probes.upstream
        if link is None:
            return None
        try:
            metrics = dict(link.metrics())
        except Exception as exc:  # never let a read break health
            return {"error": f"metrics unavailable: {type(exc).__name__}"}
        published = metrics.get("published")
        now = time.monotonic()
        if isinstance(published, (int, float)):
            if self._published is not None and now > self._published[0]:
                self.upstream_drain_rate = max(0.0, (published - self._published[1]) / (now - self._published[0]))
            self._published = (now, float(published))
        metrics.setdefault("drain_rate", self.upstream_drain_rate)
        return _jsonable(metrics)

    def _write(self, snap: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_native_id()}")
        # 0600 from creation, whatever the umask, like everything in the data dir
        # (gateway/filemodes.py); `status` runs as its owner.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # an older tmp file may have had another mode
            f.write(json.dumps(snap, default=str))
        os.replace(tmp, self.path)


def set_aside_view(probes: HealthProbes) -> dict[str, Any]:
    """Messages set aside by the gateway's MQTT links (gateway.setaside): a count per link
    and the last few of all links, newest last, for ``status`` and ``/metrics``."""
    links = {"broker": probes.client.set_aside, "upstream": probes.upstream_set_aside}
    counts: dict[str, int] = {}
    recent: list[dict[str, Any]] = []
    for name, kept in links.items():
        if kept is None:
            continue
        counts[name] = kept.count
        recent.extend({"link": name, **m} for m in kept.recent())
    recent.sort(key=lambda m: m["at"])
    return {"counts": counts, "recent": recent[-setaside.KEEP:]}


def _presence_of(presence: Presence | None) -> dict[str, Any] | None:
    return presence.view() if presence is not None else None


def _metrics_of(part: MetricsProbe | None) -> dict[str, Any] | None:
    if part is None:
        return None
    try:
        return _jsonable(dict(part.metrics()))
    except Exception as exc:
        return {"error": f"metrics unavailable: {type(exc).__name__}"}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is None or isinstance(v, (bool, int, float, str))}


__all__ = ["BridgeProbe", "Check", "HealthProbes", "HealthReporter", "MetricsProbe", "checks", "read_snapshot",
           "snapshot_path", "verdict"]
