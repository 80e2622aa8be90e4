"""A device (or anyone holding an ack URL) that sends the same ack thousands of times costs
a counter, not a row each: each status of a delivery is stored once, the repeats are
counted and shown, and the database stays small."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.http.conftest import ApiGateway, db_rows, make_api_gateway, wait_until
from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each
from tests.support import MqttProbe, bulk_register

P = "homepot/site-t"
REPEATS = 5000


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[ApiGateway]:
    a = make_api_gateway(tmp_path, start=False)
    bulk_register(tmp_path / "var", [{"device_id": "plc-1", "channels": [{"platform": "mqtt"}]}])
    a.gw.start()
    yield a
    a.close()
    a.gw.kill()
    if a.gw.notify:
        a.gw.notify.close()


def _db_pages(data_dir: Path) -> int:
    """Pages of the database in use, as a reader sees it (the WAL's committed pages
    included). Free pages are left out: the embedded broker holds the flood's messages
    for the gateway's session until they are stored, and frees their pages after."""
    return int(db_rows(data_dir, "PRAGMA page_count")[0][0]) - int(db_rows(data_dir, "PRAGMA freelist_count")[0][0])


def _counter(data_dir: Path, name: str) -> int:
    rows = db_rows(data_dir, "SELECT value FROM counters WHERE name = ?", name)
    return int(rows[0][0]) if rows else 0


def _flood(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish every payload at QoS 1 with many in flight; returns when the broker has
    PUBACKed them all."""
    done = threading.Semaphore(0)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="plc-1-flood")
    c.max_inflight_messages_set(500)
    c.max_queued_messages_set(0)
    c.on_publish = lambda *args: done.release()
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for p in payloads:
            c.publish(topic, p, qos=1)
        for _ in payloads:
            assert done.acquire(timeout=120), "an ack was not PUBACKed"
    finally:
        c.disconnect()
        c.loop_stop()


def test_5000_repeated_acks_over_mqtt_store_a_row_per_status_and_count_the_rest(gw: ApiGateway):
    probe = MqttProbe(gw.port, [f"{P}/devices/plc-1/notify"], client_id="plc-1")
    r = gw.client("tech").post("/v1/jobs", json={"job_id": "flood-1", "target": {"devices": ["plc-1"]},
                                                  "notification": {"title": "t"}})
    assert r.status_code == 202, r.text
    msgs = probe.wait_for(lambda m: [x for x in m if x[1].endswith("/notify")], timeout=20)
    message_id = json.loads(msgs[0][2])["message_id"]
    probe.close()

    def ack(status: str, n: int) -> bytes:
        return json.dumps({"message_id": message_id, "status": status, "at": "2030-01-01T00:00:00.000Z",
                           "error": f"try {n} " + "x" * 1000}).encode()

    topic = f"{P}/devices/plc-1/ack"
    _flood(gw.port, topic, [ack("received", 0)])
    wait_until(lambda: _counter(gw.data_dir, "acks_stored") == 1, timeout=20)
    wait_until(lambda: gw.client("mon").get("/v1/jobs/flood-1").json()["state"] == "acknowledged", timeout=20)
    before = _db_pages(gw.data_dir)

    # The flood: the same "received" ack again and again, then "opened" a few times.
    _flood(gw.port, topic, [ack("received", n) for n in range(1, REPEATS)] + [ack("opened", n) for n in range(3)])

    # The broker PUBACKs the device; the gateway's own client stores them after: wait for that.
    wait_until(lambda: _counter(gw.data_dir, "acks_stored") == REPEATS + 3, timeout=120)
    rows = db_rows(gw.data_dir, "SELECT status, repeats, error FROM acks WHERE message_id = ? ORDER BY id", message_id)
    assert [(s, n) for s, n, _ in rows] == [("received", REPEATS - 1), ("opened", 2)], [r[:2] for r in rows]
    assert rows[0][2].startswith("try 0 ") and rows[1][2].startswith("try 0 ")  # the first of each is kept
    counters = dict(db_rows(gw.data_dir, "SELECT name, value FROM counters"))
    assert counters["acks_repeated"] == REPEATS - 1 + 2 and counters["acks_stored"] == REPEATS + 3
    # 5,000 acks with 1 KiB of error text each would be ~5 MiB (1,300+ pages) as rows; as
    # counts, a few pages. Measured once the broker's store has let go of the flood (it
    # keeps the messages for the gateway's session until they are stored, and its pages are
    # reused, not returned, while it deletes them).
    wait_until(lambda: int(db_rows(gw.data_dir, "SELECT COUNT(*) FROM broker_messages")[0][0]) == 0, timeout=30)
    grown = _db_pages(gw.data_dir) - before
    assert grown <= 32, f"the database grew by {grown} pages"

    # Visible in jobs show and in the operator page's API.
    shown = cli(gw.config, "jobs", "show", "flood-1", "--deliveries", "--json")
    assert shown.returncode == 0, shown.stderr
    acks = json.loads(shown.stdout)["deliveries"][0]["acks"]
    assert [(a["status"], a["repeats"]) for a in acks] == [("received", REPEATS - 1), ("opened", 2)]
    text = cli(gw.config, "jobs", "show", "flood-1", "--deliveries").stdout
    assert f"acks=received(+{REPEATS - 1} repeats),opened(+2 repeats)" in text, text
    page = gw.client("mon").get("/ui/api/jobs/flood-1/deliveries").json()["deliveries"][0]
    assert [(a["status"], a["repeats"]) for a in page["acks"]] == [("received", REPEATS - 1), ("opened", 2)]
