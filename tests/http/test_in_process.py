"""The HTTP API's routes in-process, without a daemon: the real application (routes,
JSON-error middleware, auth, ack signer, readers on a test database) with strict fakes of
its two ports, the pipeline's entry points (``JobIntake``) and the health snapshot
(``HealthView``). Before the explicit wiring these routes could be reached only through a
whole daemon process (``svc.daemon.pipeline``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import parse_config
from gateway.http.acks import AckSigner
from gateway.http.auth import BasicAuth
from gateway.http.pulse import Pulse
from gateway.http.reader import Reader
from gateway.http.routes import ApiParts, api_app
from gateway.http.streams import StreamSlots
from gateway.metrics import Metrics
from gateway import migrations
from gateway.pipeline import acks
from gateway.pipeline.models import AckVia
from gateway.storage import connect
from gateway.storage import transaction as tx

MID = "0b7f0c6e-6f0e-4c1e-9b0a-6a1f1c2d3e4f"


class StrictIntake:
    """The pipeline as the API sees it. Records every call; any call the test did not
    script fails the test (a fake that says yes to everything would prove nothing)."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()
        self.acks: list[tuple[str, dict[str, Any], str]] = []

    async def submit_job(self, payload: bytes, source: str) -> str | None:
        raise AssertionError(f"unexpected submit_job from {source}")

    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool:
        raise AssertionError(f"unexpected register_device {device_id} from {source}")

    async def ack(self, device_id: str, payload: bytes, source: str, via: AckVia) -> acks.AckResult | None:
        self.acks.append((device_id, json.loads(payload), f"{source} via {via}"))
        return acks.AckResult(True, job_id="job-1", latency_ms=42.0, first=len(self.acks) == 1)


class StrictPeople:
    """The person registry's writes, refused: these tests make none."""

    async def put(self, person: Any, source: str) -> bool:
        raise AssertionError(f"unexpected person put from {source}")

    async def remove(self, person_id: str, source: str) -> bool:
        raise AssertionError(f"unexpected person remove {person_id} from {source}")


class FixedHealth:
    def __init__(self, status: str) -> None:
        self.latest = {"status": status, "checks": {"database": {"ok": status == "ok", "detail": "test"}}}

    def snapshot(self) -> dict[str, Any]:
        return self.latest


@pytest.fixture
def parts(tmp_path: Path):
    cfg = parse_config({"gateway": {"data_dir": str(tmp_path)}, "broker": {
        "listeners": [{"name": "l", "bind": "127.0.0.1:1"}], "auth": {"password_file": str(tmp_path / "passwd")}},
        "http": {"bind": "127.0.0.1:8080"}}, environ={}).config
    conn = connect(cfg.db_path)
    tx(conn, migrations.migrate)
    conn.execute("PRAGMA foreign_keys = OFF")  # one delivery row is all the ack route reads
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route) "
                 "VALUES (?, 'job-1', 'plc-1', 'sent', 0, 'mqtt')", (MID,))
    conn.close()
    made = ApiParts(cfg=cfg, jobs=StrictIntake(), health=FixedHealth("degraded"), reader=Reader(cfg.db_path),
                    auth=BasicAuth(cfg), metrics=Metrics(cfg.db_path), signer=AckSigner(b"k" * 32, "http://gw"),
                    changes=Pulse(), stopping=asyncio.Event(), streams=StreamSlots(4),
                    people=StrictPeople())
    yield made
    made.reader.close()
    made.metrics.close()
    made.auth.close()


async def test_a_signed_ack_goes_to_the_pipeline_and_a_forged_one_never_does(parts: ApiParts):
    app, _ = api_app(parts)
    intake = parts.jobs
    assert isinstance(intake, StrictIntake)
    async with TestClient(TestServer(app)) as client:
        url = parts.signer.url(MID).removeprefix("http://gw")
        forged = await client.post(url[:-4] + "0000", json={"status": "received"})
        assert forged.status == 403 and (await forged.json())["error"]["code"] == "bad_signature"
        assert intake.acks == []

        first = await client.post(url, json={"status": "received"})
        assert first.status == 202, await first.text()
        assert await first.json() == {"message_id": MID, "status": "received", "first": True, "latency_ms": 42.0}
        assert first.headers["Access-Control-Allow-Origin"] == "*"
        [(device_id, body, source)] = intake.acks
        assert (device_id, body["message_id"], body["status"], source) == ("plc-1", MID, "received",
                                                                           f"http:/v1/acks/{MID} via ack-url")
        assert body["at"]  # absent in the request: when the gateway got it

        health = await client.get("/healthz")
        assert health.status == 503 and (await health.json())["status"] == "degraded"
        unknown = await client.get("/v1/nothing")
        assert unknown.status == 404 and (await unknown.json())["error"]["code"] == "not_found"
    counted = {s.labels["result"]: s.value for m in parts.metrics.registry.collect() for s in m.samples
               if s.name == "homepot_http_acks_total"}
    assert counted == {"bad_signature": 1.0, "stored": 1.0}


def test_the_served_service_fails_the_test_when_a_fake_is_asked_what_no_test_scripted(tmp_path: Path):
    """tests/helpers/http_app.py: its alarm engine answers only scripted acks. An unscripted
    one is a 500 to the client (the handler's bug path) and, so that no test passes on it,
    an AssertionError when the service is closed; a scripted one is answered as given."""
    import httpx

    from tests.helpers.http_app import serve_api

    rule = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
            "target": {"all": True}}
    with pytest.raises(AssertionError, match="alarm ack door/d-1 by http:tech"):
        with serve_api(tmp_path, {"rules": [rule]}, users={"tech": ("technician", "tech-pw")}) as served:
            login = httpx.post(f"{served.base}/ui/login", data={"username": "tech", "password": "tech-pw"})
            assert login.status_code == 303, login.text
            with httpx.Client(base_url=served.base, cookies=login.cookies) as tech:
                csrf = tech.get("/ui/api/session").json()["csrf"]
                assert served.alarms is not None
                served.alarms.outcomes.append("unknown")
                scripted = tech.post("/ui/api/alarms/ack", json={"rule": "door", "key": "d-0"},
                                     headers={"X-CSRF-Token": csrf})
                assert scripted.status_code == 404 and scripted.json()["error"]["code"] == "unknown_alarm"
                unscripted = tech.post("/ui/api/alarms/ack", json={"rule": "door", "key": "d-1"},
                                       headers={"X-CSRF-Token": csrf})
                assert unscripted.status_code == 500
            assert [c[:3] for c in served.alarms.calls] == [("door", "d-0", "http:tech"), ("door", "d-1", "http:tech")]
